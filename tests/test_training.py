import csv
import io
import json
from pathlib import Path

import pytest
import torch

from vlm.app.run import evaluate_checkpoint, train
from vlm.training.builders import build_datamodule
from vlm.training.module import VLMModule


def test_fast_dev_run_of_the_default(make_cfg):
    metrics = train(make_cfg("debug=fast_dev_run"))
    assert metrics["train/loss"] > 0 and "val/cer" in metrics


def test_stage_freezes_and_keeps_frozen_parts_in_eval_mode(make_cfg):
    module = VLMModule(make_cfg("stage=2"))
    assert module.frozen == ["encoder.stem"]
    assert not any(p.requires_grad for p in module.model.encoder.stem.parameters())
    assert all(p.requires_grad for p in module.model.encoder.blocks.parameters())
    assert not module.model.encoder.stem.training  # from the start: Lightning keeps modes as found
    module.eval()
    module.train()
    assert not module.model.encoder.stem.training and module.model.encoder.blocks.training
    aligned = VLMModule(make_cfg("stage=align"))
    trainable = {n.split(".")[0] for n, p in aligned.model.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}  # the default resampler (pixel shuffle) has no parameters


def test_lm_loss_is_next_token_cross_entropy_on_the_answer_and_adamw_is_fused(make_cfg):
    from tests.steps import make_batch
    from vlm import IGNORE_INDEX

    cfg = make_cfg("loss.ctc_weight=0", "loss.chunk_weight=0")
    module = VLMModule(cfg)
    batch = make_batch(module.model, ["ab", "a longer answer"])
    loss, parts = module.loss(batch)
    logits = module.model(batch["input_ids"], batch["pixel_values"]).logits
    terms = [  # position t predicts token t + 1 wherever that token is labelled
        -torch.log_softmax(logits[b, t], -1)[batch["labels"][b, t + 1]]
        for b in range(logits.shape[0])
        for t in range(logits.shape[1] - 1)
        if batch["labels"][b, t + 1] != IGNORE_INDEX
    ]
    answers = sum(len(module.model.tokenizer.encode(text)) for text in ["ab", "a longer answer"])
    assert len(terms) == answers + 2  # answers and their eos
    assert torch.allclose(parts["lm"], torch.stack(terms).mean(), atol=1e-6) and torch.equal(
        loss, parts["lm"]
    )
    module.trainer = type("T", (), {"max_steps": 10})()  # what configure_optimizers reads
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is True


def test_prompt_lm_is_next_token_cross_entropy_on_the_prompts_text_only(make_cfg):
    from tests.steps import make_batch
    from vlm import IGNORE_INDEX

    module = VLMModule(make_cfg("loss.ctc_weight=0", "loss.chunk_weight=0", "loss.prompt_lm_weight=0.5"))
    batch = make_batch(module.model, ["ab", "a longer answer"])
    loss, parts = module.loss(batch)
    logits = module.model(batch["input_ids"], batch["pixel_values"]).logits
    tokenizer, ids = module.model.tokenizer, batch["input_ids"]
    prompt_text = [
        (b, t)
        for b in range(ids.shape[0])
        for t in range(ids.shape[1] - 1)
        if batch["attention_mask"][b, t + 1]
        and batch["labels"][b, t + 1] == IGNORE_INDEX
        and ids[b, t + 1] not in (tokenizer.image_token_id, tokenizer.pad_id)
    ]
    prompt_tokens = [i for i in batch["prompt_ids"][0].tolist() if i != tokenizer.pad_id]
    image_tokens = prompt_tokens.count(tokenizer.image_token_id)
    assert len(prompt_text) == 2 * (len(prompt_tokens) - image_tokens - 1)  # all but bos, both rows
    terms = [-torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]] for b, t in prompt_text]
    assert torch.allclose(parts["prompt_lm"], torch.stack(terms).mean(), atol=1e-6)
    assert torch.allclose(loss, parts["lm"] + 0.5 * parts["prompt_lm"])
    assert "prompt_lm" not in VLMModule(make_cfg()).loss(batch)[1]  # off by default


def test_one_forward_gives_logits_loss_and_what_the_auxiliary_losses_read(make_cfg):
    """The model's forward is the whole model: the loss the module trains on, and the encoder's features
    and placeholder vectors the CTC and chunk losses read, come from one call."""
    from tests.steps import make_batch

    module = VLMModule(make_cfg())
    batch = make_batch(module.model, ["ab", "a longer answer"])
    torch.manual_seed(0)
    out = module.model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"])
    features = module.model.encoder(batch["pixel_values"])
    assert torch.allclose(out.context.features, features, atol=1e-6)
    assert torch.allclose(out.context.vectors, module.model.project(features), atol=1e-6)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    _, parts = module.loss(batch)
    assert set(parts) == {"lm", "ctc", "chunk"}
    assert torch.allclose(parts["lm"], out.loss, atol=1e-6)
    assert module.model(batch["input_ids"], batch["pixel_values"]).loss is None  # no labels: no loss


def test_predict_step_generates_the_batchs_own_length_and_passes_failures_on(make_cfg):
    from tests.steps import make_batch

    module = VLMModule(make_cfg("generation.max_new_tokens=5")).eval()
    batch = make_batch(module.model, ["ab", "cd"]) | {"failed": [("bad", "unreadable")]}
    lengths = []
    module.predict_text = lambda b, max_new_tokens: lengths.append(max_new_tokens) or ["x", "y"]
    out = module.predict_step(batch | {"max_new_tokens": 2}, 0)
    assert out == {"texts": {"s0": "x", "s1": "y"}, "failed": [("bad", "unreadable")]}
    module.predict_step(batch, 0)  # no request in the batch: the run's generation.max_new_tokens
    assert lengths == [2, 5]


def test_validation_metrics_are_corpus_level_over_the_epochs_batches(make_cfg):
    """val/cer sums edits and reference characters over all decoded batches (and ranks) before dividing:
    a short line's errors weigh by its length, not as one batch's mean."""
    from tests.steps import make_batch

    module = VLMModule(make_cfg("generation.val_batches=2")).eval()
    logged = {}
    module.log = lambda name, value, **_: logged.__setitem__(name, float(value))
    outputs = iter([["abcd", "xxxxxxxx"], ["wrong"]])
    module.predict_text = lambda batch, max_new_tokens: next(outputs)
    with torch.no_grad():
        module.validation_step(make_batch(module.model, ["abcd", "abcdefgh"]), 0)  # 0 + 8 edits, 12 chars
        module.validation_step(make_batch(module.model, ["a"]), 1)  # "wrong" for "a": 5 edits, 1 char
        module.validation_step(make_batch(module.model, ["zz"]), 2)  # past val_batches: not decoded
    module.on_validation_epoch_end()
    assert logged["val/cer"] == pytest.approx(13 / 13)
    assert logged["val/exact_match"] == pytest.approx(1 / 3)
    assert module.val_cer.update_count == 0  # reset for the next validation


def test_frozen_parts_do_not_change_in_a_step(make_cfg, tmp_path):
    cfg = make_cfg("stage=2", "trainer.max_steps=2", "trainer.val_check_interval=2", "test=false")
    torch.manual_seed(0)
    before = VLMModule(cfg).model.state_dict()
    metrics = train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    after = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert torch.equal(before["encoder.stem.0.weight"], after["encoder.stem.0.weight"])
    assert not torch.equal(before["encoder.blocks.0.qkv.weight"], after["encoder.blocks.0.qkv.weight"])
    assert metrics["train/loss"] > 0


def test_bad_stage_module_is_named(make_cfg):
    with pytest.raises(ValueError, match=r"freezes 'encoder.nope'"):
        VLMModule(make_cfg("stage.freeze=[encoder.nope]"))


def test_overfit_at_test_sizes_reproduces_the_exact_strings(make_cfg):
    """The fast version of the next test: 8 samples, test sizes, 300 steps (about 20 s; the LM loss ends
    near 0.005, ten times under the bound)."""
    n = 8
    small = [f"data.source.{k}={n}" for k in ("num_train", "num_val", "num_test", "samples_per_shard")]
    small += [f"data.{k}={n}" for k in ("batch_size", "eval_batch_size", "val_samples", "shuffle_buffer")]
    cfg = make_cfg(
        "debug=overfit",
        "loss.chunk_weight=0",
        "generation.val_batches=1",
        *small,
        "trainer.max_steps=300",
        "trainer.val_check_interval=300",
        "optim.lr=3e-3",
        "optim.warmup_steps=10",
    )
    metrics = train(cfg)
    assert metrics["train/loss_lm"] < 0.05, metrics
    assert metrics["val/exact_match"] == 1.0, metrics
    assert metrics["val/cer"] == 0.0


@pytest.mark.slow
def test_overfit_reproduces_the_exact_strings(make_cfg):
    """16 samples at the default sizes (the chunk loss off: it is a reading aid, not memory); about 200 s
    on 2 cores: `make test-all`."""
    cfg = make_cfg("debug=overfit", "loss.chunk_weight=0", "generation.val_batches=1", tiny=False)
    metrics = train(cfg)
    assert metrics["train/loss"] < 0.05, metrics
    assert metrics["val/exact_match"] == 1.0, metrics
    assert metrics["val/cer"] == 0.0


def test_resume_continues_the_global_step(make_cfg, tmp_path):
    first = make_cfg("trainer.max_steps=4", "trainer.val_check_interval=2", "test=false")
    train(first)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    resumed = make_cfg(
        "trainer.max_steps=6",
        "trainer.val_check_interval=2",
        "test=false",
        f"ckpt_path={last}",
        f"hydra.run.dir={tmp_path / 'resumed'}",
    )
    train(resumed)
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 6


def test_train_then_eval_round_trip(make_cfg, tmp_path):
    metrics = train(make_cfg("trainer.max_steps=4", "trainer.val_check_interval=2", "benchmark.limit=8"))
    assert metrics["eval/samples"] == 8 and metrics["eval/vision_tokens_per_image"] == 16
    best = next((tmp_path / "run" / "checkpoints").glob("step*.ckpt"))
    ckpt = torch.load(best, weights_only=False)
    assert ckpt["hyper_parameters"]["cfg"]["encoder"]["dim"] == 64  # the resolved config travels along
    eval_cfg = make_cfg(
        f"ckpt_path={best}", "benchmark.limit=8", f"hydra.run.dir={tmp_path / 'eval'}", config="eval"
    )
    result = evaluate_checkpoint(eval_cfg)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written == pytest.approx(result)
    for field in ["cer", "wer", "exact_match", "vision_tokens_per_image", "chars_per_vision_token"]:
        assert field in written
    assert written["chars_per_vision_token"] == pytest.approx(written["mean_chars"] / 16)
    llm = next(key for key in written if key.startswith("compression_llm_")).removeprefix("compression_")
    for name in ("bytes", "gpt2", llm):
        assert written[f"compression_{name}"] == pytest.approx(written[f"mean_tokens_{name}"] / 16)
    lines = (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 8 and {"key", "prediction", "answers", "cer"} <= set(json.loads(lines[0]))
    generated = json.loads((tmp_path / "eval" / "predictions" / "predictions.json").read_text())
    assert sorted(generated) == sorted(json.loads(line)["key"] for line in lines)
    assert "| cer |" in (tmp_path / "eval" / "report.md").read_text()

    # the same predictions scored again without the model give the same numbers
    rescored = evaluate_checkpoint(
        make_cfg(
            f"ckpt_path={best}",
            "benchmark.limit=8",
            f"predictions={tmp_path / 'eval' / 'predictions'}",
            f"hydra.run.dir={tmp_path / 'rescored'}",
            config="eval",
        )
    )
    assert rescored["cer"] == pytest.approx(result["cer"]) and rescored["predictions"] != "generated"


def test_skipped_samples_are_logged(make_cfg, tmp_path):
    cfg = make_cfg(
        "trainer.max_steps=2", "trainer.val_check_interval=2", "test=false", "trainer.log_every_n_steps=1"
    )
    module = VLMModule(cfg)
    datamodule = build_datamodule(cfg.data, module.model, cfg.max_length)
    datamodule.prepare_data()
    shard = Path(datamodule.shards("train")[0])
    data = shard.read_bytes()
    start = data.index(b"\x89PNG") + 200
    shard.write_bytes(
        data[:start] + b"\x00" * 300 + data[start + 300 :]
    )  # break one image, keep the tar valid
    try:
        train(cfg.copy())
        text = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
        rows = list(csv.DictReader(io.StringIO(text)))
        skipped = [float(r["data/skipped"]) for r in rows if r.get("data/skipped")]
        assert skipped and skipped[-1] >= 1
    finally:
        shard.write_bytes(data)
