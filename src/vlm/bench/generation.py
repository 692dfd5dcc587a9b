"""Batched generation: `vlm.generation.generate` against transformers' `generate` on one model and batch.

    python -m vlm.app.bench generate --batch 8 --prompt-tokens 64 --new-tokens 256

Both decode greedily, without early stops, from the same left-padded prompts with image placeholders:
ours from the token ids and images, transformers' from the same `inputs_embeds` and attention mask.
The LLM is a freshly initialised transformers Llama (`--hidden`, `--layers`; SmolLM2's architecture)
behind a small encoder; runs alternate between the two, and the report gives the median tokens/s of
each and whether their tokens agree.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import torch

from vlm.data.processing import padded
from vlm.generation import generate
from vlm.models import projectors
from vlm.models.encoders.tiny import TinyEncoder
from vlm.models.llms.hf import build_hf_llm
from vlm.models.resamplers import PixelShuffle
from vlm.models.vlm import VisionLanguageModel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32, help="text tokens per prompt (longest)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (timed with synchronisation)")


def build(hidden: int, layers: int) -> VisionLanguageModel:
    torch.manual_seed(0)
    llm = build_hf_llm(
        config={
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": hidden * 8 // 3,
            "num_hidden_layers": layers,
            "num_attention_heads": max(1, hidden // 64),
            "num_key_value_heads": max(1, hidden // 192),
            "max_position_embeddings": 4096,
        },
        tokenizer="bytes",
    )
    model = VisionLanguageModel(
        TinyEncoder((32, 512), dim=64, depth=1, heads=2),
        functools.partial(PixelShuffle, factor=2),
        projectors.linear,
        llm,
    )
    with torch.no_grad():  # a random model's greedy path should not collapse onto one token
        for p in model.llm.parameters():
            p.normal_(std=0.05)
    return model.eval()


def prompts(model: VisionLanguageModel, batch: int, text_tokens: int):
    tok = model.tokenizer
    generator = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(batch):
        n = max(1, text_tokens - 3 * i)  # different lengths: left padding matters
        text = torch.randint(32, 127, (n,), generator=generator).tolist()
        seqs.append([tok.image_token_id] * model.vision_tokens_per_image + text)
    ids, mask = padded(seqs, tok.pad_id, left=True)
    return ids, mask, torch.randn(batch, 3, 32, 512, generator=generator)


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(args.hidden, args.layers).to(device)
    ids, mask, pixels = (t.to(device) for t in prompts(model, args.batch, args.prompt_tokens))
    hf = model.llm.model

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    n = args.new_tokens

    def ours() -> list[list[int]]:
        return generate(model, ids, mask, pixels, max_new_tokens=n, stop_ids=[-1])

    def theirs() -> list[list[int]]:
        embeds = model.embed_inputs(ids, pixels)
        out = hf.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_id,
        )
        return out.tolist()

    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    tokens = {}
    with torch.inference_mode():
        ours(), theirs()  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("ours", ours), ("transformers", theirs)):
                start = now()
                tokens[name] = fn()
                times[name].append(now() - start)
    rate = {name: args.batch * n / statistics.median(t) for name, t in times.items()}
    same = sum(a == b for a, b in zip(tokens["ours"], tokens["transformers"], strict=True))
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}\n"
        f"Llama hidden {args.hidden}, {args.layers} layers; batch {args.batch}, "
        f"{model.vision_tokens_per_image} vision + up to {args.prompt_tokens} text tokens, {n} new tokens\n"
        f"ours:         {rate['ours']:8.0f} tokens/s (runs: {', '.join(f'{t:.2f}s' for t in times['ours'])})\n"
        f"transformers: {rate['transformers']:8.0f} tokens/s "
        f"(runs: {', '.join(f'{t:.2f}s' for t in times['transformers'])})\n"
        f"ours / transformers: {rate['ours'] / rate['transformers']:.2f}x; "
        f"identical token sequences: {same}/{args.batch}"
    )
