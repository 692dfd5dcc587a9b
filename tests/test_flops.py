"""FLOP counting, peak FLOP/s and the throughput / MFU callback (vlm.training.flops, callbacks.Throughput)."""

import csv
import io
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vlm import IGNORE_INDEX
from vlm.app.run import train
from vlm.models.encoders.tiny import TinyEncoder
from vlm.models.llms.gpt import GPT, GPTConfig
from vlm.text_accounting import llm_tokenizer_name
from vlm.training.callbacks import Throughput
from vlm.training.flops import (
    PartFlopCounter,
    StepFlopCache,
    batch_shape,
    gpu_peak_flops,
    peak_flops,
    precision_format,
)
from vlm.training.module import VLMModule

# -- the counter against a hand count -------------------------------------------------------------------

B, IMAGE, CONV_OUT, ENC_DIM, ENC_HEADS = 2, (8, 16), 8, 8, 2  # encoder: one stride-2 conv, one block
N = (IMAGE[0] // 2) * (IMAGE[1] // 2)  # 32 vision tokens per image
TEXT, C, HEADS, VOCAB = 8, 16, 2, 260  # LLM: one block, width 16, byte vocabulary
T = N + TEXT


def mm(m: int, k: int, n: int) -> int:
    """Forward FLOPs of (m, k) @ (k, n)."""
    return 2 * m * k * n


def hand_count(train_encoder: bool, train_llm: bool) -> dict[str, int]:
    """Matmul FLOPs of one forward + backward of `tiny_parts` from the shapes alone.

    Backward of a linear layer: its input gradient (one matmul the size of the forward) when its input
    needs a gradient, its weight gradient (another) when it is trainable. Attention backward as torch
    counts it: scores recomputed, then four products, 2.5 times the forward. Attention counts the full
    T x T scores even when causal.
    """
    conv = 2 * B * CONV_OUT * N * 3 * 3 * 3  # (B, 3, 8, 16) -> (B, 8, 4, 8), kernel 3x3 over 3 channels
    enc_linears = [mm(B * N, ENC_DIM, 3 * ENC_DIM), mm(B * N, ENC_DIM, ENC_DIM)]  # qkv, proj
    enc_linears += [mm(B * N, ENC_DIM, 4 * ENC_DIM), mm(B * N, 4 * ENC_DIM, ENC_DIM)]  # MLP
    enc_attention = 2 * B * ENC_HEADS * N * N * (2 * (ENC_DIM // ENC_HEADS))
    encoder = conv + sum(enc_linears) + enc_attention
    if train_encoder:  # pixels need no gradient: the conv computes only its weight gradient
        encoder += conv + 2 * sum(enc_linears) + enc_attention * 5 // 2

    projector = mm(B * N, ENC_DIM, C)
    projector += projector * (2 if train_encoder else 1)  # input gradient only if the encoder trains

    llm_linears = [mm(B * T, C, C)] * 4 + [mm(B * T, C, 4 * C), mm(B * T, 4 * C, C)]  # q k v o, MLP
    llm_linears += [mm(B * T, C, VOCAB)]  # head
    llm_attention = 2 * B * HEADS * T * T * (2 * (C // HEADS))
    llm = sum(llm_linears) + llm_attention
    # the input always needs a gradient (it carries the projector's): frozen, only the input gradients
    llm += sum(llm_linears) * (2 if train_llm else 1) + llm_attention * 5 // 2
    return {"encoder": encoder, "projector": projector, "llm": llm}


def tiny_parts() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "encoder": TinyEncoder(image_size=IMAGE, dim=ENC_DIM, depth=1, heads=ENC_HEADS, stages=1),
        "projector": nn.Linear(ENC_DIM, C),
        "llm": GPT(
            GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=1, n_head=HEADS, n_kv_head=HEADS, n_embd=C)
        ),
    }


@pytest.mark.parametrize(("train_encoder", "train_llm"), [(True, True), (False, False)])
def test_counter_matches_a_hand_count_per_part(train_encoder, train_llm):
    parts = tiny_parts()
    parts["encoder"].requires_grad_(train_encoder)
    parts["llm"].requires_grad_(train_llm)
    pixels = torch.randn(B, 3, *IMAGE)
    ids = torch.randint(0, 256, (B, TEXT))
    with PartFlopCounter(parts) as counter:
        vision = parts["projector"](parts["encoder"](pixels))  # (B, N, C)
        embeds = torch.cat([vision, parts["llm"].embed(ids)], dim=1)  # (B, T, C)
        parts["llm"](embeds).square().mean().backward()
    assert dict(counter.flops) == hand_count(train_encoder, train_llm)


def test_heads_called_through_a_method_count_as_their_part():
    """Submodules are hooked, so a head whose `loss` method calls its layers still counts as the head."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(C, 4)

        def loss(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x).square().mean()

    head, trunk = Head(), nn.Linear(C, C)
    x = torch.randn(3, C)
    with PartFlopCounter({"trunk": trunk, "head": head}) as counter:
        (head.loss(trunk(x)) + (x @ x.T).sum()).backward()
    assert counter.flops["head"] == 3 * mm(3, C, 4)  # forward, input and weight gradients
    assert counter.flops["trunk"] == 2 * mm(3, C, C)  # x needs no gradient: no input gradient
    assert counter.flops["other"] == mm(3, C, 3)  # outside every part


def test_a_part_passing_its_input_through_takes_no_backward():
    """resampler=identity returns the encoder's output tensor itself: the encoder's backward stays its own."""
    parts = {"encoder": nn.Linear(C, C), "resampler": nn.Identity(), "projector": nn.Linear(C, 4)}
    with PartFlopCounter(parts) as counter:
        parts["projector"](parts["resampler"](parts["encoder"](torch.randn(3, C)))).sum().backward()
    assert dict(counter.flops) == {"encoder": 2 * mm(3, C, C), "resampler": 0, "projector": 3 * mm(3, C, 4)}


def test_activation_checkpointing_counts_the_recomputed_forward():
    """What runs: each block's forward again in backward (so MFU becomes hardware FLOPs utilisation)."""
    parts = tiny_parts()
    parts["llm"].set_activation_checkpointing(True)
    pixels, ids = torch.randn(B, 3, *IMAGE), torch.randint(0, 256, (B, TEXT))
    with PartFlopCounter(parts) as counter:
        vision = parts["projector"](parts["encoder"](pixels))
        parts["llm"](torch.cat([vision, parts["llm"].embed(ids)], dim=1)).square().mean().backward()
    # the block again up to the last tensor backward needs: torch's checkpoint stops there (early stop),
    # so the MLP's output projection is not recomputed
    recomputed = 4 * mm(B * T, C, C) + mm(B * T, C, 4 * C) + 2 * B * HEADS * T * T * 2 * (C // HEADS)
    expected = hand_count(True, True)
    assert dict(counter.flops) == expected | {"llm": expected["llm"] + recomputed}


# -- the FLOPs of a real step against the batch shape ---------------------------------------------------


def vlm_batch(module: VLMModule, rows: int, answer_tokens: int, generator: torch.Generator) -> dict:
    """A training batch of `rows` one-image samples: the image's placeholders then `answer_tokens`."""
    model = module.model
    vision = model.vision_tokens_per_image
    answers = torch.randint(97, 123, (rows, answer_tokens), generator=generator)  # a..z
    placeholders = torch.full((rows, vision), model.tokenizer.image_token_id)
    return {
        "input_ids": torch.cat([placeholders, answers], dim=1),
        "labels": torch.cat([torch.full((rows, vision), IGNORE_INDEX), answers], dim=1),
        "attention_mask": torch.ones(rows, vision + answer_tokens, dtype=torch.long),
        "pixel_values": torch.randn(rows, 3, *model.encoder.preprocessing.size, generator=generator),
        "images_per_sample": torch.ones(rows, dtype=torch.long),
        "answers": [[bytes(row).decode()] for row in answers.tolist()],
    }


def count_step(module: VLMModule, batch: dict) -> dict[str, int]:
    from vlm.training.flops import model_parts

    with PartFlopCounter(model_parts(module)) as counter:
        module.loss(batch)[0].backward()
    module.zero_grad()
    return dict(counter.flops)


def test_step_flops_are_quadratic_in_the_length_so_three_counts_predict_the_rest(make_cfg):
    module = VLMModule(make_cfg())
    generator = torch.Generator().manual_seed(0)
    cache = StepFlopCache()
    counted = {}
    for answer_tokens in (5, 9, 20, 13, 30):
        batch = vlm_batch(module, 2, answer_tokens, generator)
        group, length = batch_shape(batch)
        counted[length] = count_step(module, batch)
        if len(counted) <= 4:
            assert cache.get(group, length) is None  # not yet fitted: count it
            cache.add(group, length, counted[length])
    assert group in cache.fitted  # the fourth count matched the polynomial through the first three
    assert cache.get(group, length) == counted[length]  # the fifth length, predicted exactly
    assert set(counted[length]) == {"encoder", "resampler", "projector", "llm", "ctc_head", "chunk_head"}
    assert counted[length]["resampler"] == 0  # pixel shuffle only moves numbers


def test_a_cost_that_is_not_quadratic_is_counted_at_every_length():
    cache = StepFlopCache()
    for length in (1, 2, 3, 4):
        cache.add(("g",), length, {"llm": length**3})
    assert ("g",) in cache.not_polynomial and cache.get(("g",), 5) is None
    cache = StepFlopCache()
    for length in (1, 2, 3, 4):
        cache.add(("g",), length, {"llm": 7 * length**2 + 3 * length + 11})
    assert cache.get(("g",), 10) == {"llm": 7 * 100 + 30 + 11}


# -- peak FLOP/s ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "number_format", "tflops"),
    [
        ("NVIDIA H200", "bf16", 989.5),
        ("NVIDIA H200 NVL", "bf16", 835.5),
        ("NVIDIA H100 80GB HBM3", "bf16", 989.5),  # the SXM part
        ("NVIDIA H100 PCIe", "fp16", 756.5),
        ("NVIDIA H100 NVL", "tf32", 417.5),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
        ("NVIDIA A100 80GB PCIe", "bf16", 312.0),
        ("NVIDIA A10G", "bf16", 70.0),
        ("NVIDIA A10", "bf16", 125.0),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA L40S", "bf16", 362.05),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
        ("NVIDIA GeForce RTX 3090", "fp32", 35.6),
        ("Tesla V100-SXM2-16GB", "fp16", 125.0),
        ("Tesla V100-PCIE-32GB", "fp16", 112.0),
        ("Tesla V100S-PCIE-32GB", "fp32", 16.4),
        ("Tesla T4", "fp16", 65.0),
    ],
)
def test_gpu_peak_table_by_device_name(name, number_format, tflops):
    assert gpu_peak_flops(name, number_format) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize(
    ("name", "number_format"),
    [
        ("Tesla V100-SXM2-16GB", "bf16"),
        ("Tesla T4", "tf32"),
        ("NVIDIA L40", "bf16"),
        ("NVIDIA GH200 480GB", "bf16"),
    ],
)
def test_gpu_without_a_peak_gives_none(name, number_format):
    """No bf16/tf32 tensor cores, or a GPU not in the table (L40 is not L4 nor L40S)."""
    assert gpu_peak_flops(name, number_format) is None


def test_precision_format():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision_format("bf16-mixed", cuda) == "bf16" and precision_format("16-mixed", cuda) == "fp16"
    assert precision_format("32-true", cpu) == "fp32" and precision_format("64-true", cpu) is None
    default = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # fp32 matmuls in TF32 on the GPU, not on the CPU
        assert precision_format("32-true", cuda) == "tf32" and precision_format("32-true", cpu) == "fp32"
        torch.set_float32_matmul_precision("highest")
        assert precision_format("32-true", cuda) == "fp32"
    finally:
        torch.set_float32_matmul_precision(default)


def test_cpu_peak_is_a_measured_matmul_cached_per_process():
    first, source = peak_flops(torch.device("cpu"), "32-true")
    assert first > 1e8 and "measured fp32 matmul" in source  # any CPU multiplies faster than 0.1 GFLOP/s
    assert peak_flops(torch.device("cpu"), "32-true")[0] == first  # not measured again


# -- the callback ---------------------------------------------------------------------------------------


class Recorder:
    """A logger that keeps what it is given."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.rows.append(dict(metrics))


def test_callback_rates_and_mfu_with_a_fake_clock(make_cfg):
    module = VLMModule(make_cfg())
    batch = vlm_batch(module, 2, 12, torch.Generator().manual_seed(0))
    flops = sum(count_step(module, batch).values())
    clock = iter([10.0, 14.0])  # the window's two batches take 4 s
    callback = Throughput(window=2, peak_flops=1e12, clock=lambda: next(clock))
    recorder = Recorder()
    trainer = SimpleNamespace(world_size=2, loggers=[recorder], global_step=0, precision="32-true")
    callback.on_train_start(trainer, module)
    for _ in range(3):  # the first batch of a shape is counted and not timed; the next two are timed
        callback.on_train_batch_start(trainer, module, batch, 0)
        module.loss(batch)[0].backward()
        callback.on_train_batch_end(trainer, module, None, batch, 0)
    shares, window = recorder.rows
    assert sum(shares.values()) == pytest.approx(1.0)
    assert set(shares) >= {"perf/flops_share_encoder", "perf/flops_share_llm", "perf/flops_share_ctc_head"}
    vision_tokens = module.model.vision_tokens_per_image
    llm = llm_tokenizer_name(module.model.tokenizer)
    llm_tokens = sum(len(module.model.tokenizer.encode(a[0])) for a in batch["answers"]) / len(
        batch["answers"]
    )
    expected = {
        "perf/samples_per_s": 2 * 2 * 2 / 4,  # 2 batches of 2 samples on each of 2 ranks in 4 s
        "perf/images_per_s": 2 * 2 * 2 / 4,
        "perf/tokens_per_s": 2 * 2 * (vision_tokens + 12) * 2 / 4,
        "perf/vision_tokens_per_sample": vision_tokens,
        "perf/padding_share": 0.0,  # every row full
        "perf/chars_per_vision_token": 12 / vision_tokens,  # 12 letters a..z per answer
        f"perf/compression_{llm}": llm_tokens / vision_tokens,
        "perf/flops_per_step": flops * 2,  # one batch on every rank
        "perf/tflops_per_s": 2 * flops * 2 / 4 / 1e12,
        "perf/mfu": 2 * flops / 4 / 1e12,  # one rank's FLOP/s over one device's peak
    }
    assert {key: window[key] for key in expected} == pytest.approx(expected)
    assert window["perf/peak_memory_gb"] > 0


def test_validation_time_is_left_out_of_the_window(make_cfg):
    module = VLMModule(make_cfg())
    batch = vlm_batch(module, 2, 12, torch.Generator().manual_seed(0))
    clock = iter([0.0, 1.0, 101.0, 102.0])  # batch, then 100 s of validation, then a batch
    callback = Throughput(window=2, peak_flops=1e12, clock=lambda: next(clock))
    recorder = Recorder()
    trainer = SimpleNamespace(world_size=1, loggers=[recorder], global_step=0, precision="32-true")
    callback.on_train_start(trainer, module)
    for step in range(3):
        callback.on_train_batch_start(trainer, module, batch, step)
        module.loss(batch)[0].backward()
        callback.on_train_batch_end(trainer, module, None, batch, step)
        if step == 1:
            callback.on_validation_start(trainer, module)
    assert recorder.rows[-1]["perf/samples_per_s"] == pytest.approx(4 / 2.0)  # 4 samples in 2 s, not 102


def test_bad_callback_settings_are_named():
    with pytest.raises(ValueError, match=r"callbacks\.throughput\.window"):
        Throughput(window=0)
    with pytest.raises(ValueError, match=r"callbacks\.throughput\.peak_flops"):
        Throughput(peak_flops=-1.0)


def test_a_short_run_logs_every_perf_key(make_cfg, tmp_path):
    cfg = make_cfg(
        "trainer.max_steps=10", "trainer.val_check_interval=5", "test=false", "callbacks.throughput.window=2"
    )
    train(cfg)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "run" / "csv" / "metrics.csv").read_text())))
    logged = {key for row in rows for key, value in row.items() if key.startswith("perf/") and value}
    rates = {"tokens_per_s", "images_per_s", "samples_per_s", "tflops_per_s", "mfu"}
    llm = llm_tokenizer_name(VLMModule(cfg).model.tokenizer)
    sizes = {"vision_tokens_per_sample", "padding_share", "peak_memory_gb", "flops_per_step"}
    reference = {"compression_bytes", "compression_gpt2"}  # conf/train.yaml reference_tokenizers
    sizes |= {"chars_per_vision_token", f"compression_{llm}", *reference}
    shares = {"encoder", "resampler", "projector", "llm", "ctc_head", "chunk_head"}
    assert logged == {f"perf/{k}" for k in rates | sizes} | {f"perf/flops_share_{k}" for k in shares}
    mfu = [float(row["perf/mfu"]) for row in rows if row.get("perf/mfu")]
    assert all(0 < value < 1 for value in mfu)  # against this CPU's measured matmul peak
