"""Text-side controls at the vision arm's budget K (`context=`): positions, a training step, generation,
the parameter count of text_conv, and a sweep over the arms through the CLI."""

import csv
import json

import pytest
from hydra.utils import instantiate

from tests.conftest import TINY_DATA, TINY_MODEL, run_cli
from tests.steps import raw_sample, train_step
from vlm.contracts import context_inputs
from vlm.data.processing import Collator, SampleProcessor
from vlm.data.skips import Skip
from vlm.training.module import VLMModule

TEXTS = [
    "short line",
    "a rendered line of text that is longer than K positions in either tokenizer, bytes or BPE",
]
CONTROLS = ("text_meanpool", "text_conv", "truncate", "full_text")


def processor_for(model, context: str, max_length: int = 256) -> SampleProcessor:
    return SampleProcessor(
        model.tokenizer,
        model.encoder.preprocessing,
        model.vision_tokens_per_image,
        max_length,
        context=context,
    )


def build(make_cfg, context: str, *overrides: str) -> tuple[VLMModule, SampleProcessor, dict]:
    """The tiny module of a context arm, its processor and a collated batch of `TEXTS`."""
    module = VLMModule(make_cfg(f"context={context}", *overrides))
    processor = processor_for(module.model, context)
    samples = [processor(raw_sample(f"s{i}", text)) for i, text in enumerate(TEXTS)]
    return module, processor, Collator(module.model.tokenizer.pad_id)(samples)


def holds(ids: list[int], run: list[int]) -> bool:
    return any(ids[i : i + len(run)] == run for i in range(len(ids)))


@pytest.mark.parametrize("context", CONTROLS)
def test_each_control_fills_its_positions_trains_and_generates(make_cfg, context):
    # one step reaches the compressor through the chunk loss only (nanochat zero-inits the LLM's output
    # projections, so the first LM gradient stops before the placeholders): text_conv keeps it here
    module, _, batch = build(
        make_cfg, context, *(["context.chunk_loss=true"] if context == "text_conv" else [])
    )
    model, tokenizer = module.model, module.model.tokenizer
    K = model.vision_tokens_per_image
    placeholders = (batch["input_ids"] == tokenizer.image_token_id).sum(-1)
    assert batch["pixel_values"].shape[0] == 0  # no image is read
    if context in ("text_meanpool", "text_conv"):
        assert placeholders.tolist() == [K, K]
        vectors = model.encode(**context_inputs(batch)).vectors
        assert vectors.shape == (len(TEXTS), K, model.llm.hidden_size)
    else:
        assert placeholders.tolist() == [0, 0]
        prompt = batch["prompt_ids"][1][batch["prompt_mask"][1].bool()].tolist()
        ids = tokenizer.encode(TEXTS[1])
        assert len(ids) > K and holds(prompt, ids[:K]) and holds(prompt, ids) == (context == "full_text")
        short = batch["prompt_ids"][0][batch["prompt_mask"][0].bool()].tolist()
        if context == "truncate":  # the short text padded to exactly K positions
            assert len(prompt) == len(short) and len(tokenizer.encode(TEXTS[0])) < K
        else:
            assert len(prompt) - len(short) == len(ids) - len(tokenizer.encode(TEXTS[0]))

    changed = train_step(module, batch)
    assert not any(name.startswith("encoder.") for name in changed)  # it never runs
    if context == "text_conv":
        compressor = {name for name, _ in model.named_parameters() if name.startswith("resampler.")}
        assert compressor and compressor <= changed  # the compressor sits in the resampler's place
    if context == "text_meanpool":
        assert not any(name.startswith("resampler.") for name, _ in model.named_parameters())
        assert any(name.startswith("projector.") for name in changed)
    if context in ("truncate", "full_text"):
        assert not any(name.startswith(("resampler.", "projector.")) for name in changed)

    module.eval()
    predictions = module.predict_text(batch, max_new_tokens=3)
    assert len(predictions) == len(TEXTS) and all(isinstance(p, str) for p in predictions)


def test_text_arms_skip_the_ctc_loss_and_in_prompt_arms_the_chunk_loss(make_cfg, caplog):
    meanpool, _, batch = build(make_cfg, "text_meanpool")
    assert meanpool.ctc_head is None and meanpool.chunk_head is not None
    assert set(meanpool.loss(batch)[1]) == {"lm", "chunk"}
    assert "loss.ctc_weight=0.5 is not applied: context=text_meanpool does not run the encoder" in caplog.text
    truncate, _, batch = build(make_cfg, "truncate")
    assert truncate.ctc_head is None and truncate.chunk_head is None
    assert set(truncate.loss(batch)[1]) == {"lm"}
    assert "loss.chunk_weight=1.0 is not applied: context=truncate" in caplog.text
    conv, _, batch = build(make_cfg, "text_conv")  # its own layout: no chunk loss (context.chunk_loss)
    assert conv.ctc_head is None and conv.chunk_head is None
    assert set(conv.loss(batch)[1]) == {"lm"}
    assert "is not applied: context=text_conv lays its vectors out its own way" in caplog.text
    forced, _, _ = build(make_cfg, "text_conv", "context.chunk_loss=true")
    assert forced.chunk_head is not None


def test_a_sample_without_context_text_is_an_error_naming_it(make_cfg):
    _, processor, _ = build(make_cfg, "text_conv")
    raw = raw_sample("caption-7", "a cat")
    raw["json"] = json.dumps({**json.loads(raw["json"]), "task": "caption"}).encode()
    with pytest.raises(ValueError, match="sample 'caption-7' \\(task 'caption'\\) has no context text"):
        processor(raw)
    raw["json"] = json.dumps({**json.loads(raw["json"]), "context_text": "the page"}).encode()
    assert processor(raw)["context_ids"] == processor.tokenizer.encode("the page")


def test_full_text_over_max_length_is_skipped_as_too_long(make_cfg):
    model = VLMModule(make_cfg("context=full_text")).model
    line = "x" * 60
    assert processor_for(model, "truncate", max_length=120)(raw_sample("long", line))
    with pytest.raises(Skip, match="'long': too_long"):
        processor_for(model, "full_text", max_length=120)(raw_sample("long", line))


def test_text_conv_has_about_the_tiny_encoders_parameters(make_cfg):
    cfg = make_cfg("context=text_conv", tiny=False)
    encoder = instantiate(cfg.encoder)
    compressor = instantiate(cfg.context.compressor)(in_dim=cfg.llm.n_embd, tokens=16)
    counts = [sum(p.numel() for p in part.parameters()) for part in (compressor, encoder)]
    print(f"text_conv {counts[0]:,} parameters, encoder=tiny {counts[1]:,}")
    assert 0.5 < counts[0] / counts[1] < 2


def test_sweep_over_the_arms_through_the_cli(tmp_path, data_dir):
    proc = run_cli(
        "train.py",
        "-m",
        "context=vision,text_meanpool,text_conv,truncate",
        *TINY_MODEL,
        *TINY_DATA,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false",
        "generation.max_new_tokens=4",
        "test=false",
        "logger=csv",
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={tmp_path}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in range(4):
        rows = list(csv.DictReader((tmp_path / str(job) / "csv" / "metrics.csv").open()))
        assert any(row.get("val/cer") for row in rows), (job, rows)


@pytest.mark.parametrize("context", ["text_conv", "truncate"])
def test_a_text_arm_is_scored_by_the_benchmark_after_training(make_cfg, tmp_path, context):
    """With test=true the benchmark generates from the same text context as training (no pixels)."""
    from vlm.app.run import train

    metrics = train(
        make_cfg(
            f"context={context}", "trainer.max_steps=2", "trainer.val_check_interval=2", "benchmark.limit=8"
        )
    )
    assert metrics["eval/samples"] == 8
    generated = json.loads((tmp_path / "run" / "eval" / "predictions" / "predictions.json").read_text())
    assert len(generated) == 8  # every item generated from its text, none failed
