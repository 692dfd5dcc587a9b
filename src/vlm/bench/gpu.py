"""The GPU check (issue 20): on one CUDA device, within about 10 minutes, the figures docs/benchmarks.md
keeps for a GPU, appended there as a dated section with the device, commit and command.

    make gpu-check                                  # python -m vlm.app.bench gpu --out docs/benchmarks.md
    python -m vlm.app.bench gpu --only train        # one part: train | generate | fsdp

1. `train`: bf16 training steps (autocast, fused AdamW, as bf16-mixed trains) of `experiment=deepseek_ocr`
   (DeepEncoder base 1024 px -> linear -> nanochat d20) and `experiment=nanovlm` (SigLIP B/16-512 -> pixel
   shuffle 4 -> SmolLM2-135M) at their official sizes with fresh weights (`OFFICIAL`): tokens/s, model
   TFLOP/s (counted by torch on the step's ops, `vlm.training.flops`) and MFU against the device's
   datasheet bf16 peak, peak memory. The batch's samples have text of different lengths (`--text-min`,
   `--text-max`); each is run unpacked (padded to the longest) and, where the LLM takes segment ids
   (nanochat), packed into rows of the recipe's `max_length` (`data.packing`), alternating.
2. `generate`: `python -m vlm.app.bench generate` on the device at 256 and 2,048 new tokens (ours against
   transformers' `generate`, identical tokens asserted).
3. `fsdp`: a one-GPU FSDP smoke run of train.py (`trainer=fsdp trainer.devices=1`, 3 steps at test sizes).

It refuses to run without CUDA, and prints the device before anything else.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from vlm.bench.train import timed_run, training_step

PARTS = ("train", "generate", "fsdp")
# fresh weights at the released sizes (no file is read): SmolLM2-135M's config.json, nanochat d20's sizes
OFFICIAL = {
    "deepseek_ocr": ["experiment=deepseek_ocr", "encoder.pretrained=null", "llm.checkpoint=null"],
    "nanovlm": [
        "experiment=nanovlm",
        "encoder.pretrained=null",
        "llm.pretrained=null",
        "llm.tokenizer=bytes",
        "+llm.config={model_type: llama, hidden_size: 576, intermediate_size: 1536, num_hidden_layers: 30,"
        " num_attention_heads: 9, num_key_value_heads: 3, vocab_size: 49152, max_position_embeddings: 8192,"
        " rope_theta: 100000, rms_norm_eps: 1.0e-5, tie_word_embeddings: true}",
    ],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", choices=PARTS, action="append", help="run these parts (default: all)")
    parser.add_argument("--batch", type=int, default=8, help="samples per training step")
    parser.add_argument("--text-min", type=int, default=64, help="fewest text tokens of a sample")
    parser.add_argument("--text-max", type=int, default=512, help="most text tokens of a sample")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, alternating")
    parser.add_argument("--out", type=Path, help="append the section to this file (e.g. docs/benchmarks.md)")


def require_cuda() -> torch.device:
    """The CUDA device, or SystemExit saying why there is none."""
    if not torch.cuda.is_available():
        raise SystemExit(
            f"error: the GPU check needs a CUDA device; torch {torch.__version__} sees none "
            f"(CUDA build: {torch.version.cuda or 'no'}). Run it on a machine with a GPU."
        )
    device = torch.device("cuda", torch.cuda.current_device())
    print(
        f"device: {torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    )
    return device


def varied_samples(model, count: int, text_min: int, text_max: int) -> list[dict]:
    """`count` processed samples (`SampleProcessor`'s format): one image's placeholders and a prompt token,
    then an answer of a length spread evenly over [text_min, text_max] (random ids, fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    tokenizer, size = model.tokenizer, model.encoder.preprocessing.size
    high = min(256, tokenizer.image_token_id)
    lengths = torch.linspace(text_min, text_max, count).round().long().tolist()
    samples = []
    for index, length in enumerate(lengths):
        answer = torch.randint(0, high, (length,), generator=generator).tolist()
        samples.append(
            {
                "key": f"s{index}",
                "prompt_ids": [tokenizer.image_token_id] * model.vision_tokens_per_image + [10],
                "answer_ids": [*answer, tokenizer.eos_id],
                "pixel_values": torch.randn(1, 3, *size, generator=generator),
                "answers": [""],
            }
        )
    return samples


def train_figures(name: str, overrides: list[str], args, device: torch.device) -> list[dict]:
    """One row per layout (unpacked, packed where the LLM can): tokens/s, TFLOP/s, MFU, peak GiB (MFU
    and memory on CUDA only; the tests run it on the CPU at test sizes)."""
    from vlm.config import compose
    from vlm.data.processing import Collator, PackingCollator, to_device
    from vlm.training.flops import PartFlopCounter, gpu_peak_flops, model_parts
    from vlm.training.module import VLMModule

    cfg = compose("train", ["hydra.run.dir=.", "logger=csv", *overrides])
    torch.manual_seed(0)
    module = VLMModule(cfg).to(device)
    model = module.model
    module.trainer = SimpleNamespace(max_steps=1000)
    optimizer = module.configure_optimizers()["optimizer"]
    module.trainer = None
    samples = varied_samples(model, args.batch, args.text_min, args.text_max)
    longest = max(len(s["prompt_ids"]) + len(s["answer_ids"]) for s in samples)
    layouts = {"unpacked": Collator(model.tokenizer.pad_id)}
    if getattr(model.llm, "supports_packing", False):
        layouts["packed"] = PackingCollator(model.tokenizer.pad_id, max(longest, int(cfg.max_length)))
    batches = {layout: to_device(collate(samples), device) for layout, collate in layouts.items()}
    steps = {
        layout: training_step(lambda b=batch: module.loss(b)[0], optimizer, device, bf16=True)
        for layout, batch in batches.items()
    }
    flops = {}
    for layout, step in steps.items():  # also the warm-up
        with PartFlopCounter(model_parts(module)) as counter:
            step()
        flops[layout] = sum(counter.flops.values())
        step()
    times = {layout: [] for layout in steps}
    peaks = {layout: [] for layout in steps}
    order = list(steps.items())
    for round_ in range(args.repeats):
        for layout, step in order if round_ % 2 == 0 else order[::-1]:
            seconds, peak = timed_run(step, args.steps, device)
            times[layout].append(seconds)
            peaks[layout].append(peak)
    peak_flops = gpu_peak_flops(torch.cuda.get_device_name(device), "bf16") if device.type == "cuda" else None
    rows = []
    for layout, batch in batches.items():
        seconds = statistics.median(times[layout]) / args.steps
        tokens = int(batch["attention_mask"].sum())
        achieved = flops[layout] / seconds
        rows.append(
            {
                "recipe": name,
                "layout": layout,
                "rows x length": "x".join(map(str, batch["input_ids"].shape)),
                "padding": f"{1 - tokens / batch['input_ids'].numel():.1%}",
                "tokens/s": f"{tokens / seconds:,.0f}",
                "TFLOP/s": f"{achieved / 1e12:.1f}",
                "MFU": f"{achieved / peak_flops:.1%}" if peak_flops else "n/a",
                "peak GiB": f"{max(peaks[layout]) / 2**30:.1f}" if peaks[layout][0] is not None else "n/a",
                "ms/step": f"{1000 * seconds:.0f}",
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


def command_output(command: list[str], timeout: float) -> str:
    """A command's output (stdout and stderr), or why it failed, as text for the report."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s: {' '.join(command)}"
    tail = (done.stdout + done.stderr).strip().splitlines()[-25:]
    status = "" if done.returncode == 0 else f"(exit status {done.returncode})\n"
    return status + "\n".join(tail)


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(args: argparse.Namespace) -> None:
    device = require_cuda()
    parts = args.only or list(PARTS)
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device)
    section = [
        f"## GPU check, {datetime.date.today().isoformat()}: {name}",
        "",
        f"Commit {commit()}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"`python -m vlm.app.bench gpu {' '.join(sys.argv[2:])}`".rstrip()
        + ".",
        "",
    ]
    if "train" in parts:
        rows = []
        for recipe, overrides in OFFICIAL.items():
            try:
                rows += train_figures(recipe, overrides, args, device)
            except Exception as error:  # one recipe's failure is reported, the others still run
                rows.append({"recipe": recipe, "layout": f"failed: {type(error).__name__}: {error}"})
            torch.cuda.empty_cache()  # the recipe's model and optimizer are gone
            print(markdown(rows[-1:]) if rows else "", flush=True)
        keys = max(rows, key=len)
        rows = [{key: row.get(key, "") for key in keys} for row in rows]
        section += [
            f"bf16 training steps at official sizes, fresh weights, batch {args.batch} (text "
            f"{args.text_min}-{args.text_max} tokens per sample), median of {args.repeats} runs of "
            f"{args.steps} steps, packed and unpacked alternating:",
            "",
            markdown(rows),
            "",
        ]
    if "generate" in parts:
        for new_tokens in (256, 2048):
            command = [sys.executable, "-m", "vlm.app.bench", "generate", "--device", "cuda"]
            command += ["--new-tokens", str(new_tokens)]
            section += [f"`{' '.join(command[1:])}`:", "", "```", command_output(command, 240), "```", ""]
    if "fsdp" in parts:
        command = [sys.executable, "train.py", "trainer=fsdp", "trainer.devices=1", "sizes=tiny"]
        command += ["trainer.max_steps=3", "test=false", "logger=csv", "hydra.run.dir=logs/gpu_check/fsdp"]
        section += ["One-GPU FSDP smoke run:", "", "```", command_output(command, 300), "```", ""]
    section.append(f"(The check took {time.perf_counter() - start:.0f} s.)")
    text = "\n".join(section) + "\n"
    print(text)
    if args.out is not None:
        with args.out.open("a", encoding="utf-8") as file:
            file.write("\n" + text)
        print(f"appended to {args.out}")
