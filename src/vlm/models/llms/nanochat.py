"""nanochat checkpoints and tokenizers for the nanochat-architecture GPT (`llm=nanochat_d20|d32`).

A checkpoint directory holds `model_<step:06d>.pt` (a state dict; nanochat saves `transformer.wte`
in bf16 and the rest in fp32) and `meta_<step:06d>.json`, whose `model_config` gives the sizes. A
tokenizer directory holds `tokenizer.pkl` (a pickled tiktoken Encoding) and `token_bytes.pt`. Either
may be a local directory or a Hub id (`owner/name`, or `owner/name/sub/folder` for files in a folder
of the repo), fetched only when online and read from the Hub cache when offline.

Nothing pickled runs when loading: the state dict is read weights-only (vlm.checkpoint) and
the tokenizer with an unpickler that resolves only what a tiktoken Encoding needs.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from vlm.checkpoint import UnreadableCheckpointError, load_weights_only
from vlm.models.llms.gpt import GPT, GPTConfig
from vlm.models.llms.lora import apply_lora
from vlm.models.llms.tokenizer import ByteTokenizer, NanochatTokenizer
from vlm.models.pretrained import checkpoint_dir, load_strict, weight_dtype

log = logging.getLogger(__name__)

MODEL_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
COMPILED_PREFIX = "_orig_mod."  # torch.compile's wrapper puts this in front of every name


def read_checkpoint(
    source: str, step: int | None = None, key: str = "llm.checkpoint"
) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """(state dict, meta's `model_config`, model file) of a nanochat checkpoint: the latest step in the
    directory, or `step`. The state dict is read weights-only (no code from the file runs), with
    torch.compile's `_orig_mod.` prefix stripped."""
    directory = checkpoint_dir(source, ["meta_*.json"], key)
    steps = sorted(
        int(m.group(1))
        for f in directory.glob("meta_*.json")
        if (m := re.fullmatch(r"meta_(\d{6,})\.json", f.name))
    )
    if not steps:
        raise FileNotFoundError(
            f"{key}={source!r}: no meta_<step>.json in {directory} (a nanochat checkpoint directory)"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(
            f"{key}={source!r} has no step {step}; its steps: {', '.join(map(str, steps))}"
        )
    meta_file = directory / f"meta_{step:06d}.json"
    model_file = directory / f"model_{step:06d}.pt"
    if not Path(source).expanduser().is_dir():  # a Hub repo: fetch the chosen step's weights only
        model_file = checkpoint_dir(source, [model_file.name], key) / model_file.name
    if not model_file.is_file():
        raise FileNotFoundError(f"{key}={source!r}: {meta_file.name} has no {model_file.name} next to it")

    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as error:  # not JSON (or not text)
        raise UnreadableCheckpointError(f"{meta_file} is not a JSON file: {error}") from error
    model_config = meta.get("model_config") if isinstance(meta, dict) else None
    missing = [k for k in MODEL_CONFIG_KEYS if not isinstance(model_config, dict) or k not in model_config]
    if missing:
        raise ValueError(f"{meta_file}: model_config lacks {', '.join(missing)}")
    extra = sorted(set(model_config) - set(MODEL_CONFIG_KEYS))
    if extra:
        log.warning("%s: model_config keys %s are not used by this GPT", meta_file, ", ".join(extra))

    state = load_weights_only(model_file, mmap=True)
    if not isinstance(state, dict):
        raise ValueError(f"{model_file} holds a {type(state).__name__}, not a state dict")
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{model_file}: not tensors: {', '.join(not_tensors)}")
    state = {k.removeprefix(COMPILED_PREFIX): v for k, v in state.items()}
    return state, {k: int(model_config[k]) for k in MODEL_CONFIG_KEYS}, model_file


def load_tokenizer(source: str, key: str = "llm.tokenizer") -> NanochatTokenizer:
    """nanochat's tokenizer from a directory with `tokenizer.pkl` or a Hub id."""
    directory = checkpoint_dir(source, ["tokenizer.pkl"], key)
    return NanochatTokenizer.from_directory(directory)


class _NoTokenizerYet:
    """Lets the GPT be built at the checkpoint's vocabulary before the tokenizer's rows are added."""

    vocab_size = 0


def load_checkpoint(
    source: str,
    step: int | None = None,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    key: str = "llm.checkpoint",
    config_sizes: dict[str, int] | None = None,
) -> GPT:
    """A GPT with the weights of a nanochat checkpoint, at the sizes of its meta's `model_config`.

    Loading is strict: a missing, unexpected or mis-shaped name raises `CheckpointMismatchError`
    naming it. `tokenizer` (default: the byte tokenizer) is then attached; rows its ids need beyond
    the checkpoint's vocabulary (`<image>`) are appended (`GPT.grow_vocab`), the others stay as loaded.
    `config_sizes` that differ from the checkpoint's are named in a warning (the checkpoint's win).
    """
    state, model_config, model_file = read_checkpoint(source, step, key)
    differ = [
        f"{name}={value} (checkpoint: {model_config[name]})"
        for name, value in (config_sizes or {}).items()
        if model_config[name] != value
    ]
    if differ:
        log.warning("%s: the config says %s; using the checkpoint's sizes", key, ", ".join(differ))
    config = GPTConfig(**model_config)
    tokenizer = tokenizer or ByteTokenizer()
    if isinstance(tokenizer, NanochatTokenizer) and tokenizer.encoding.n_vocab > config.vocab_size:
        raise ValueError(
            f"{tokenizer.source} has {tokenizer.encoding.n_vocab} tokens but the checkpoint {model_file} "
            f"has vocab_size {config.vocab_size}: they do not belong together"
        )
    with torch.device("meta"):  # no memory and no init for weights that are overwritten anyway
        model = GPT(config, tokenizer=_NoTokenizerYet()).to(dtype)
    model.to_empty(device="cpu")
    model.reset_rotary()
    load_strict(model, state, "", str(model_file))
    model.set_tokenizer(tokenizer)
    log.info("%s: loaded %s (%s)", key, model_file, ", ".join(f"{k}={v}" for k, v in model_config.items()))
    return model


def build_nanochat(
    checkpoint: str | None = None,
    tokenizer: str | None = None,
    step: int | None = None,
    n_layer: int = 20,
    n_embd: int = 1280,
    n_head: int = 10,
    n_kv_head: int | None = None,
    vocab_size: int = 65536,
    sequence_len: int = 2048,
    dtype: str = "float32",
    activation_checkpointing: bool = False,
    lora: Mapping | None = None,
    option: str = "llm=nanochat",
) -> GPT:
    """Hydra entry point of `llm=nanochat_d20|nanochat_d32`.

    With `checkpoint` (a nanochat checkpoint directory or Hub id; `step`: which one, default the
    latest) the sizes are the checkpoint's own (meta's `model_config`): the sizes given here are for a
    fresh model, and where they differ a warning names both. Without it, a freshly initialised GPT at
    the sizes given (the vocabulary at least the tokenizer's). `tokenizer`: a nanochat tokenizer
    directory or Hub id, with `<image>` appended as a new id (the embedding and head grow by a row);
    null: the byte tokenizer (260 ids). `dtype: bfloat16` keeps the weights in bf16 (frozen backbones).
    `lora` (r > 0): LoRA adapters on the linear layers, the rest frozen (`vlm.models.llms.lora`).
    """
    torch_dtype = weight_dtype(dtype, f"{option}: llm.dtype")
    tok = load_tokenizer(tokenizer) if tokenizer else ByteTokenizer()
    sizes = {
        "sequence_len": sequence_len,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_kv_head": n_kv_head or n_head,
        "n_embd": n_embd,
    }
    if checkpoint:
        if not tokenizer:
            log.warning(
                "%s: llm.checkpoint is set but llm.tokenizer is null; the byte tokenizer's ids are not "
                "the checkpoint's vocabulary (point llm.tokenizer at its tokenizer directory)",
                option,
            )
        model = load_checkpoint(checkpoint, step, tok, torch_dtype, config_sizes=sizes)
    else:
        config = GPTConfig(vocab_size=max(vocab_size, tok.vocab_size), **sizes)
        model = GPT(config, tok).to(torch_dtype)
    model.set_activation_checkpointing(activation_checkpointing)
    return apply_lora(model, lora)
