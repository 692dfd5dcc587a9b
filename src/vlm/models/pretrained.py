"""Reading released checkpoints: safetensors shards from a local path or the Hub, loaded strictly."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from vlm.checkpoint import UnreadableCheckpointError, load_weights_only

WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def weight_dtype(name: str, key: str = "dtype") -> torch.dtype:
    """`float32` or `bfloat16` (for frozen backbones) as a torch dtype; anything else is an error."""
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"{key} must be one of {', '.join(WEIGHT_DTYPES)}, got {name!r}")
    return WEIGHT_DTYPES[name]


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the module: names the missing, unexpected, mis-shaped keys."""


def checkpoint_files(source: str) -> list[Path]:
    """The safetensors files of `source`: a file, a directory (its shard index, else every
    `*.safetensors` in it) or a Hub id, which is downloaded only when online (or found in the cache)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    path = checkpoint_dir(source)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / shard for shard in index_shards(index)]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def index_shards(index: Path) -> list[str]:
    """The shard files a `model.safetensors.index.json` names (its `weight_map`: tensor -> file), each
    present next to it."""
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # ValueError: not JSON
        raise UnreadableCheckpointError(
            f"{index} is not a shard index (a JSON object whose weight_map maps tensor names to files): "
            f"{type(error).__name__}: {error}"
        ) from error
    not_files = [
        str(shard) for shard in shards if not isinstance(shard, str) or not (index.parent / shard).is_file()
    ]
    if not_files:
        raise UnreadableCheckpointError(
            f"{index} names shards that are not files next to it: {', '.join(not_files)}"
        )
    return shards


def checkpoint_dir(
    source: str, patterns: tuple[str, ...] | list[str] = ("*.safetensors", "*.json"), key: str = "pretrained"
) -> Path:
    """`source` if it is a local directory; else the Hub repo `owner/name` (or its folder
    `owner/name/sub/folder`) with the files matching `patterns`, downloaded only when online and
    read from the Hub cache when offline. `key` names the setting in errors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{key}={source!r} is a file; point it at the directory that holds it")
    parts = source.strip("/").split("/")
    if source.startswith(("/", "~", ".")) or "\\" in source or len(parts) < 2:
        raise FileNotFoundError(f"{key}={source!r}: no such directory")
    repo, folder = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        snapshot = snapshot_download(
            repo, allow_patterns=[f"{folder}/{p}" if folder else p for p in patterns]
        )
    except (LocalEntryNotFoundError, HFValidationError) as error:
        raise FileNotFoundError(
            f"{key}={source!r} is not a local directory and is not in the Hub cache; the Hub is only "
            f"asked when online (unset HF_HUB_OFFLINE), or point it at a local directory"
        ) from error
    return Path(snapshot) / folder


def download_file(repo_id: str, names: tuple[str, ...]) -> Path:
    """The first of `names` that the Hub repo `repo_id` has, from the cache when offline."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError  # also raised offline for an uncached file

    for name in names:
        try:
            return Path(hf_hub_download(repo_id, name))
        except EntryNotFoundError:
            continue
    raise FileNotFoundError(
        f"pretrained={repo_id!r} is not a local path, and none of {', '.join(names)} is in that Hub repo "
        f"or, offline (HF_HUB_OFFLINE=1), in the Hub cache; point it at a local file or directory"
    )


@contextmanager
def reading_safetensors(file: Path) -> Iterator[None]:
    """safetensors' errors say what is wrong but not with which file: name it."""
    try:
        yield
    except SafetensorError as error:
        raise UnreadableCheckpointError(
            f"{file} is not a readable safetensors file (empty or truncated?): {error}"
        ) from error


def read_checkpoint_file(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of one checkpoint file: safetensors, or a torch pickle read weights-only (no code
    from the file runs)."""
    if file.suffix == ".safetensors":
        with reading_safetensors(file):
            return load_file(str(file))
    state = load_weights_only(file)
    if not isinstance(state, dict):
        raise ValueError(f"{file} holds a {type(state).__name__}, not a state dict")
    return state


def read_tensors(source: str, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of `source` whose names start with one of `prefixes`, under their checkpoint names."""
    tensors = {}
    for file in checkpoint_files(source):
        with reading_safetensors(file), safe_open(str(file), framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name.startswith(prefixes):
                    tensors[name] = shard.get_tensor(name)
    return tensors


def load_strict(module: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str, source: str) -> None:
    """Load `tensors`, named `prefix` + the module's own names, into `module` strictly: any missing,
    unexpected or mis-shaped key is an error that names it as the checkpoint does."""
    expected = {prefix + name: value for name, value in module.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = sorted(
        f"{name} (checkpoint {tuple(tensors[name].shape)}, model {tuple(expected[name].shape)})"
        for name in set(tensors) & set(expected)
        if tensors[name].shape != expected[name].shape
    )
    problems = [
        f"{label}: {', '.join(names)}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if names
    ]
    if problems:
        raise CheckpointMismatchError(f"{type(module).__name__} cannot load {source}: " + "; ".join(problems))
    module.load_state_dict({name[len(prefix) :]: value for name, value in tensors.items()}, strict=True)
