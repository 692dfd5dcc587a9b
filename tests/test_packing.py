"""Sequence packing (issue 20): several samples per training row, told apart by segment ids, giving the
loss the unpacked batch gives on the same samples."""

import pytest
import torch

from tests.steps import raw_sample
from vlm.data.processing import Collator, PackingCollator, SampleProcessor, pack
from vlm.models.llms.gpt import GPT, GPTConfig, segment_mask, segment_positions
from vlm.training.module import VLMModule

ANSWERS = ["ab", "a longer answer", "xyz", "the fourth and longest answer of all", "q"]


def test_pack_fills_rows_first_fit_in_decreasing_length():
    rows = pack([5, 3, 8, 2, 4], capacity=10)
    assert rows == [[2, 3], [0, 4], [1]]  # 8+2, 5+4, 3
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="sample 1 has 11 tokens, more than a packed row's 10"):
        pack([3, 11], capacity=10)


def test_segment_positions_restart_and_the_mask_stays_within_a_segment():
    segments = torch.tensor([[1, 1, 1, 2, 2, 0]])
    assert segment_positions(segments).tolist() == [[0, 1, 2, 0, 1, 0]]
    steps = torch.tensor([[1, 4, 2, 3, 1, 1]])
    assert segment_positions(segments, steps).tolist() == [[0, 1, 5, 0, 3, 0]]
    mask = segment_mask(segments)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False]  # its segment, causally
    assert mask[2].tolist() == [True, True, True, False, False, False]
    assert mask[5].tolist() == [False] * 5 + [True]  # padding sees itself only


def test_a_packed_row_gives_each_sequence_its_own_logits():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=260, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)).eval()
    for p in gpt.parameters():  # nanochat's init zeroes the output projections and the head
        torch.nn.init.normal_(p, std=0.2)
    first, second = torch.randint(0, 260, (1, 7)), torch.randint(0, 260, (1, 4))
    row = torch.cat([first, second, torch.zeros(1, 2, dtype=torch.long)], 1)  # + 2 padding
    segments = torch.tensor([[1] * 7 + [2] * 4 + [0] * 2])
    with torch.no_grad():
        packed = gpt(gpt.embed(row), segment_ids=segments)
        alone = [gpt(gpt.embed(first)), gpt(gpt.embed(second))]
    assert torch.allclose(packed[:, :7], alone[0], atol=1e-5)
    assert torch.allclose(packed[:, 7:11], alone[1], atol=1e-5)
    assert not torch.allclose(packed[:, 7:11], gpt(gpt.embed(row))[:, 7:11], atol=1e-3)  # unpacked differs


@pytest.mark.parametrize("overrides", [[], ["loss.prompt_lm_weight=0.5", "model.text_position_unit=token"]])
def test_packed_loss_equals_the_unpacked_loss_on_the_same_samples(make_cfg, overrides):
    """Every part: the answer's next-token loss, the prompt's, and the OCR reading losses (CTC, chunk)
    that read each sample's own answer; positions in bytes with a vision stride (the default) or tokens."""
    module = VLMModule(make_cfg(*overrides)).eval()
    model = module.model
    processor = SampleProcessor.for_model(model, max_length=module.cfg.max_length)
    samples = [processor(raw_sample(f"s{i}", answer)) for i, answer in enumerate(ANSWERS)]
    plain = Collator(model.tokenizer.pad_id)(samples)
    packed = PackingCollator(model.tokenizer.pad_id, module.cfg.max_length)(samples)
    assert packed["input_ids"].shape[0] < len(ANSWERS)  # rows hold several samples
    assert (packed["labels"] != -100).sum() == (plain["labels"] != -100).sum()
    assert packed["attention_mask"].sum() == plain["attention_mask"].sum()
    with torch.no_grad():
        loss, parts = module.loss(plain)
        packed_loss, packed_parts = module.loss(packed)
    assert set(parts) == set(packed_parts) and len(parts) >= 3
    for name, value in parts.items():
        assert torch.allclose(packed_parts[name], value, atol=1e-5), name
    assert torch.allclose(packed_loss, loss, atol=1e-5)


def test_packing_needs_an_llm_that_takes_segments(make_cfg):
    module = VLMModule(make_cfg("experiment=nanovlm"))
    model = module.model
    processor = SampleProcessor.for_model(model, max_length=module.cfg.max_length)
    samples = [processor(raw_sample(f"s{i}", answer)) for i, answer in enumerate(ANSWERS[:2])]
    batch = PackingCollator(model.tokenizer.pad_id, module.cfg.max_length)(samples)
    with pytest.raises(ValueError, match=r"data\.packing needs an LLM that attends within packed samples"):
        module.loss(batch)


def test_the_datamodule_packs_training_batches_only_when_asked(make_cfg):
    from vlm.training.builders import build_datamodule

    cfg = make_cfg("data.packing=true")
    module = VLMModule(cfg)
    datamodule = build_datamodule(cfg.data, module.model, cfg.max_length)
    datamodule.prepare_data()
    loader = datamodule.train_dataloader()
    assert isinstance(loader.collate_fn.collator, PackingCollator)
    batch = next(iter(loader))
    assert len(batch["keys"]) == cfg.data.batch_size > batch["input_ids"].shape[0]  # rows hold several
    assert batch["input_ids"].shape[1] <= cfg.max_length
    assert torch.isfinite(module.loss(batch)[0])
    assert type(datamodule.eval_dataloader("val").collate_fn.collator) is Collator


def test_throughput_counts_samples_not_rows_and_the_padding_share(make_cfg):
    from types import SimpleNamespace

    from tests.test_flops import Recorder
    from vlm.training.callbacks import Throughput

    module = VLMModule(make_cfg())
    pad_id, max_length = module.model.tokenizer.pad_id, module.cfg.max_length
    processor = SampleProcessor.for_model(module.model, max_length=max_length)
    samples = [processor(raw_sample(f"s{i}", answer)) for i, answer in enumerate(ANSWERS)]
    windows, shares = [], []
    for collate in (Collator(pad_id), PackingCollator(pad_id, max_length)):
        batch = collate(samples)
        shares.append(1 - float(batch["attention_mask"].sum()) / batch["input_ids"].numel())
        clock = iter([10.0, 14.0])  # the window's two batches take 4 s
        callback = Throughput(window=2, peak_flops=1e12, clock=lambda clock=clock: next(clock))
        recorder = Recorder()
        trainer = SimpleNamespace(world_size=1, loggers=[recorder], global_step=0, precision="32-true")
        callback.on_train_start(trainer, module)
        for _ in range(3):  # the first batch of a shape is counted, not timed
            callback.on_train_batch_start(trainer, module, batch, 0)
            callback.on_train_batch_end(trainer, module, None, batch, 0)
        windows.append(recorder.rows[-1])
    assert shares[1] < shares[0]
    for window, share in zip(windows, shares, strict=True):
        assert window["perf/samples_per_s"] == pytest.approx(2 * len(ANSWERS) / 4)
        assert window["perf/padding_share"] == pytest.approx(share)
    assert windows[0]["perf/tokens_per_s"] == pytest.approx(windows[1]["perf/tokens_per_s"])
