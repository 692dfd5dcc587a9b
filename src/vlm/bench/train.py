"""Training step: ours (the project's config and training loss) against transformers' Idefics3 at equal sizes.

    python -m vlm.app.bench train [--batch 4 --text-tokens 64 --steps 3 --repeats 5] [--config OVERRIDE ...]

Ours is built from the train config (`experiment=nanovlm` at the sizes in `DEFAULT_CONFIG`, then the
`--config` overrides): SigLIP (timm) -> pixel shuffle -> linear without bias -> a transformers Llama,
trained through `VLMModule.loss` with the optimizer of `VLMModule.configure_optimizers`. Theirs is
`Idefics3ForConditionalGeneration` (SmolVLM's architecture) made from the same sizes, fresh weights,
trained through its own `labels` loss with AdamW as transformers' Trainer builds it by default (fused).
Both get the same batch (vision placeholders + text tokens, loss on the text tokens), dtype and
hyperparameters, and the same parts train (all of them unless the stage freezes some). One step =
forward + loss + backward + optimizer step. After warm-up steps, runs of `--steps` steps alternate
between the two for `--repeats` rounds. The report gives the median tokens/s of each (every position
of the sequence counts, image and text), the peak memory (CUDA: `max_memory_allocated` over the runs;
CPU: live tensors during one extra profiled step) and the median of the rounds' speed ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from torch import nn

from vlm import IGNORE_INDEX
from vlm.config import compose
from vlm.models.encoders.siglip import SigLIPEncoder
from vlm.models.llms.hf import HFCausalLM
from vlm.models.resamplers import PixelShuffle
from vlm.models.vlm import VisionLanguageModel
from vlm.training.module import VLMModule, count_parameters
from vlm.training.optim import param_groups

# SmolVLM's shape (SigLIP B/16 -> pixel shuffle -> linear -> SmolLM2's Llama: 3 query heads per KV head of
# width 64), shrunk so that a step takes about half a second on one CPU core: 224 px (14x14 patches) through 4 blocks of
# width 192, pixel shuffle 2 (49 tokens; 14 is not divisible by SmolVLM's 4), a 4-layer Llama of width 384.
DEFAULT_CONFIG = [
    "experiment=nanovlm",
    "sizes=tiny",
    "encoder.model_name=vit_base_patch16_siglip_224",
    "encoder.image_size=[224,224]",
    "encoder.model_kwargs={embed_dim:192,depth:4,num_heads:3}",
    "resampler.factor=2",
    "llm.config.hidden_size=384",
    "llm.config.intermediate_size=1024",
    "llm.config.num_hidden_layers=4",
    "llm.config.num_attention_heads=6",
    "llm.config.num_key_value_heads=2",
    "llm.config.vocab_size=8192",
]
PARAMETER_TOLERANCE = 0.001  # relative difference of the parameter counts that still counts as equal
# timm's GELU variants -> transformers' names for the same function
HIDDEN_ACT = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}
# our parts -> the Idefics3 modules that hold them (the pixel shuffle has no weights in either)
IDEFICS3_PARTS = {
    "encoder": ("model.vision_model",),
    "resampler": (),
    "projector": ("model.connector",),
    "llm": ("model.text_model", "lm_head"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        nargs="+",
        action="extend",
        default=[],
        metavar="OVERRIDE",
        help="Hydra overrides of our train config, after the benchmark's defaults (sizes, composition)",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens per sample after the image")
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each before the runs")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each, alternating")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="float32, or bfloat16 autocast around forward and loss (as bf16-mixed training)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile each side's forward + loss")


def check_idefics3_shape(model: VisionLanguageModel) -> None:
    """Raise unless the model has Idefics3's parts: SigLIP (last layer) -> pixel shuffle -> linear
    without bias -> a transformers causal LM, on square images."""
    problems = []
    if not isinstance(model.encoder, SigLIPEncoder):
        problems.append(f"needs encoder=siglip, got {model.encoder.option}")
    elif model.encoder.feature_layer != -1:
        problems.append(f"needs encoder.feature_layer=-1, got {model.encoder.feature_layer}")
    elif model.encoder.preprocessing.size[0] != model.encoder.preprocessing.size[1]:
        problems.append(
            f"needs square images, got encoder.image_size={list(model.encoder.preprocessing.size)}"
        )
    if not isinstance(model.resampler, PixelShuffle):
        problems.append(f"needs resampler=pixel_shuffle, got {model.resampler.option}")
    elif model.resampler.factor[0] != model.resampler.factor[1]:
        problems.append(f"needs a square pixel shuffle, got resampler.factor={list(model.resampler.factor)}")
    if not isinstance(model.projector, nn.Linear) or model.projector.bias is not None:
        problems.append("needs projector=linear projector.bias=false (Idefics3's connector)")
    if not isinstance(model.llm, HFCausalLM):
        problems.append(f"needs a transformers LLM (llm=smollm2_135m, ...), got {type(model.llm).__name__}")
    if problems:
        raise ValueError("the train benchmark compares with Idefics3 and " + "; ".join(problems))


def build_idefics3(model: VisionLanguageModel, attn_implementation: str) -> nn.Module:
    """`Idefics3ForConditionalGeneration` with `model`'s sizes, fresh weights."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig

    check_idefics3_shape(model)
    trunk = model.encoder.trunk
    block = trunk.blocks[0]
    act = getattr(block.mlp.act, "approximate", None)
    if not isinstance(block.mlp.act, nn.GELU) or act not in HIDDEN_ACT:
        raise ValueError(f"the SigLIP MLP's activation {block.mlp.act} has no Idefics3 equivalent")
    vision = Idefics3VisionConfig(
        hidden_size=trunk.embed_dim,
        intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(trunk.blocks),
        num_attention_heads=block.attn.num_heads,
        image_size=model.encoder.preprocessing.size[0],
        patch_size=trunk.patch_embed.patch_size[0],
        hidden_act=HIDDEN_ACT[act],
        layer_norm_eps=trunk.norm.eps,
    )
    text = copy.deepcopy(model.llm.model.config)  # our LLM's own config (a LlamaConfig for SmolLM2)
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=model.resampler.factor[0],  # square: check_idefics3_shape
        image_token_id=model.tokenizer.image_token_id,
        tie_word_embeddings=text.tie_word_embeddings,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return Idefics3ForConditionalGeneration(config)


def freeze_like(theirs: nn.Module, frozen: list[str]) -> None:
    """Freeze (and put in eval mode) the Idefics3 modules that hold our frozen parts."""
    for name in frozen:
        if name not in IDEFICS3_PARTS:
            raise ValueError(
                f"the stage freezes {name!r}, which has no counterpart in Idefics3; the train benchmark "
                f"freezes whole parts only ({', '.join(IDEFICS3_PARTS)})"
            )
        for path in IDEFICS3_PARTS[name]:
            theirs.get_submodule(path).requires_grad_(False).eval()


def synthetic_batch(model: VisionLanguageModel, batch_size: int, text_tokens: int) -> dict:
    """Each sample: the image's placeholders, then random text tokens; the loss is on the text."""
    generator = torch.Generator().manual_seed(0)
    image_id = model.tokenizer.image_token_id
    placeholders = torch.full((batch_size, model.vision_tokens_per_image), image_id)
    text = torch.randint(0, min(256, image_id), (batch_size, text_tokens), generator=generator)
    input_ids = torch.cat([placeholders, text], dim=1)
    return {
        "input_ids": input_ids,
        "labels": input_ids.masked_fill(input_ids == image_id, IGNORE_INDEX),
        "pixel_values": torch.randn(batch_size, 3, *model.encoder.preprocessing.size, generator=generator),
    }


def training_step(
    loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, device: torch.device, bf16: bool
) -> Callable[[], torch.Tensor]:
    """forward + loss (under bf16 autocast if asked), backward, optimizer step; returns the loss."""

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def timed_run(step: Callable[[], torch.Tensor], steps: int, device: torch.device) -> tuple[float, int | None]:
    """Seconds for `steps` steps, and the peak memory allocated meanwhile (CUDA only)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) if cuda else None


def profiled_peak(step: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Peak bytes of live tensors on `device` during one step, from torch's memory profiler (the CPU
    allocator keeps no peak statistic). Parameters, gradients and optimizer state count too."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # not kineto's error that a CPU-only machine has no GPU
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        with warnings.catch_warnings():  # deprecated for CUDA's memory snapshots, which do not cover the CPU
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(str(path), device=str(device))
        _, sizes = json.loads(path.read_text())
    return max(sum(categories) for categories in sizes)


def run(args: argparse.Namespace) -> None:
    for name in ("batch", "text_tokens", "steps", "warmup", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, bf16 = torch.device(args.device), args.dtype == "bfloat16"

    cfg = compose("train", ["hydra.run.dir=.", "logger=csv", *DEFAULT_CONFIG, *args.config])
    for part in ("encoder", "llm"):
        if cfg[part].get("pretrained"):
            raise ValueError(f"the train benchmark builds fresh weights: set {part}.pretrained=null")
    torch.manual_seed(0)
    module = VLMModule(cfg).to(device)
    model = module.model
    theirs = build_idefics3(model, cfg.llm.attn_implementation).to(device).train()
    freeze_like(theirs, module.frozen)

    counts = {"ours": count_parameters(module), "transformers": count_parameters(theirs)}
    (total, trainable), (their_total, their_trainable) = counts["ours"], counts["transformers"]
    if abs(total - their_total) > PARAMETER_TOLERANCE * their_total or trainable != their_trainable:
        raise ValueError(
            f"the two models differ: ours has {total:,} parameters ({trainable:,} trainable), Idefics3 "
            f"{their_total:,} ({their_trainable:,} trainable)"
        )

    module.trainer = SimpleNamespace(max_steps=args.warmup + args.steps * args.repeats)
    optimizer = module.configure_optimizers()["optimizer"]  # as training makes it (fused on CUDA)
    module.trainer = None
    # transformers' Trainer default: optim="adamw_torch_fused" (torch >= 2.8), decay on matrices only
    their_optimizer = torch.optim.AdamW(
        param_groups({"model": theirs}, {"model": cfg.optim.lr}, cfg.optim.weight_decay),
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        fused=True,
    )

    batch = {k: v.to(device) for k, v in synthetic_batch(model, args.batch, args.text_tokens).items()}
    attention_mask = torch.ones_like(batch["input_ids"])

    def our_loss() -> torch.Tensor:
        return module.loss(batch)[0]

    def their_loss() -> torch.Tensor:
        return theirs(
            input_ids=batch["input_ids"],
            attention_mask=attention_mask,
            pixel_values=batch["pixel_values"][:, None],  # (B, images per sample, 3, H, W)
            labels=batch["labels"],
            use_cache=False,
        ).loss

    if args.compile:
        our_loss, their_loss = torch.compile(our_loss), torch.compile(their_loss)
    steps = {
        "ours": training_step(our_loss, optimizer, device, bf16),
        "transformers": training_step(their_loss, their_optimizer, device, bf16),
    }
    first_loss = {name: float(step()) for name, step in steps.items()}
    for _ in range(args.warmup - 1):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks: dict[str, list[int]] = {name: [] for name in steps}
    order = list(steps.items())
    for round_ in range(args.repeats):
        for name, step in order if round_ % 2 == 0 else order[::-1]:  # ABBA: neither always goes first
            seconds, peak = timed_run(step, args.steps, device)
            times[name].append(seconds)
            if peak is not None:
                peaks[name].append(peak)
    if device.type != "cuda":
        peaks = {name: [profiled_peak(step, device)] for name, step in steps.items()}

    tokens = args.batch * batch["input_ids"].shape[1] * args.steps
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    # each round's two runs are neighbours in time, so their ratio is the one least moved by other load
    ratio = statistics.median(t / o for o, t in zip(times["ours"], times["transformers"], strict=True))
    vision, text = theirs.config.vision_config, theirs.config.text_config
    grid = vision.image_size // vision.patch_size
    peak_how = "max_memory_allocated" if device.type == "cuda" else "torch profiler, one step"

    def side(name: str) -> str:
        runs = ", ".join(f"{t:.3f}s" for t in times[name])
        return (
            f"{rate[name]:8.0f} tokens/s, peak {max(peaks[name]) / 2**20:7.1f} MiB "
            f"(runs of {args.steps} steps: {runs})"
        )

    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; {device}, {args.dtype}"
        f"{', compiled' if args.compile else ''}\n"
        f"SigLIP {vision.image_size}px/{vision.patch_size} ({grid}x{grid} patches), width "
        f"{vision.hidden_size} x {vision.num_hidden_layers} blocks ({vision.num_attention_heads} heads, "
        f"MLP {vision.intermediate_size}); pixel shuffle {theirs.config.scale_factor} -> "
        f"{model.vision_tokens_per_image} tokens; linear -> {text.model_type} width {text.hidden_size} x "
        f"{text.num_hidden_layers} layers ({text.num_attention_heads} heads / {text.num_key_value_heads} "
        f"KV, MLP {text.intermediate_size}), vocab {text.vocab_size}\n"
        f"batch {args.batch} x ({model.vision_tokens_per_image} image + {args.text_tokens} text tokens), "
        f"loss on the text tokens\n"
        f"parameters: ours {total:,}, transformers {their_total:,} "
        f"({'equal' if total == their_total else f'{total / their_total - 1:+.3%}'}; trainable "
        f"{trainable:,} each)\n"
        f"AdamW fused: ours {bool(optimizer.defaults['fused'])}, transformers True\n"
        f"loss at the first step: ours {first_loss['ours']:.3f}, "
        f"transformers {first_loss['transformers']:.3f}\n"
        f"ours:         {side('ours')}\n"
        f"transformers: {side('transformers')}\n"
        f"ours / transformers: {ratio:.2f}x tokens/s (median of the rounds' ratios); peak memory "
        f"{max(peaks['ours']) / max(peaks['transformers']):.2f}x ({peak_how})"
    )
