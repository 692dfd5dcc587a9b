"""Reading checkpoints without running anything from them.

A checkpoint is data from whoever wrote it. Its tensors and containers are read weights-only: torch's
unpickler rebuilds tensors and plain Python values and refuses any other global, so a pickled payload
is an error instead of a call. The project's Lightning checkpoints hold nothing else (the run config is
saved as plain dicts and lists, a BPE tokenizer as its JSON string), so no type is added to torch's
allow-list.

The run config saved in a Lightning checkpoint (`hyper_parameters.cfg`) is rebuilt by eval.py and the
LoRA merge: its `model` and `data` are instantiated. Before that, every `_target_` in them must be a
class or function of the `vlm` package, and no string may be an interpolation (a saved config is
resolved) or a URL that webdataset hands to a shell (`pipe:`).

This module needs torch alone (the models load their pretrained files through it); rebuilding a
VLMModule from a checkpoint, or parts of one (`init_from`), is the training layer's
(`vlm.training.checkpointing`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from pickle import UnpicklingError
from typing import Any
from urllib.parse import urlparse

import torch

BUILT_FROM_CONFIG = ("model", "data")  # the parts of a saved run config that are instantiated
PROJECT_PACKAGE = "vlm"
COMMAND_PACKAGES = ("vlm.app", "vlm.bench")  # what commands run: never a config's component


class UnreadableCheckpointError(ValueError):
    """A checkpoint file that is empty, truncated or not a checkpoint at all."""


class UnsafeConfigError(ValueError):
    """A checkpoint whose saved run config would build something outside the project or run a command."""


def load_weights_only(file: str | Path, mmap: bool = False) -> Any:
    """`torch.load` of tensors and plain containers only (on the CPU); a refused file (UnpicklingError) or
    an unreadable one is an error that names it. `mmap` maps the tensors instead of reading them."""
    file = Path(file)
    if file.is_file() and file.stat().st_size == 0:
        raise UnreadableCheckpointError(f"{file} is empty")
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"the global {found.group(1)}" if found else "an object that is not a tensor or a plain value"
        raise UnpicklingError(
            f"Weights only load failed for {file}: it holds {what}, which is never run "
            "(checkpoints may hold only tensors and plain containers)"
        ) from error
    except FileNotFoundError:
        raise
    except (EOFError, RuntimeError, OSError) as error:  # OSError: a truncated file, memory-mapped
        raise UnreadableCheckpointError(
            f"{file} is not a readable torch checkpoint (truncated or another format): {error}"
        ) from error


def read_lightning_checkpoint(file: str | Path) -> dict:
    """A Lightning checkpoint of train.py, read weights-only, with its saved run config checked."""
    checkpoint = load_weights_only(file)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    cfg = hparams.get("cfg") if isinstance(hparams, dict) else None
    if not isinstance(cfg, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UnreadableCheckpointError(
            f"{file} is not a checkpoint of train.py: it lacks state_dict or hyper_parameters.cfg"
        )
    check_saved_config(cfg, str(file))
    return checkpoint


def check_saved_config(cfg: Mapping, source: str) -> None:
    """Refuse a saved run config whose `model` or `data` would build anything outside the `vlm` package,
    resolve an interpolation or run a shell command; the error names the key and its value."""
    for part in BUILT_FROM_CONFIG:
        for key, value in _items(cfg.get(part), part):
            problem = _refusal(key, value)
            if problem:
                raise UnsafeConfigError(
                    f"{source}: the saved config's {key}={value!r} {problem}; a checkpoint's config is not "
                    "trusted to run anything"
                )


def _items(node: Any, key: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of `node` and of everything in it, containers included."""
    yield key, node
    if isinstance(node, Mapping):
        for name, value in node.items():
            yield from _items(value, f"{key}.{name}")
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _items(value, f"{key}.{index}")


def _refusal(key: str, value: Any) -> str | None:
    """Why the saved `value` at `key` may not be built, or None."""
    if key.endswith("._target_") and not is_project_target(value):
        return f"is not a public class or function of the {PROJECT_PACKAGE} package"
    if isinstance(value, str) and "${" in value:
        return "is an interpolation (a saved config is resolved; this one would resolve again)"
    if isinstance(value, str) and runs_command(value):
        return "is a URL that runs a shell command (webdataset's pipe:)"
    return None


def is_project_target(target: Any) -> bool:
    """Whether `_target_: <target>` names a public class or function defined in a module of the `vlm`
    package, as `module.name` (not one the module imports: `vlm.data.tar_reading.gopen` is webdataset's),
    outside the commands (`vlm.app.prepare.main` would run a command)."""
    if not isinstance(target, str) or target.startswith(tuple(f"{p}." for p in COMMAND_PACKAGES)):
        return False
    module_name, _, name = target.rpartition(".")
    parts = target.split(".")
    if parts[0] != PROJECT_PACKAGE or len(parts) < 2 or any(not p or p.startswith("_") for p in parts):
        return False
    try:
        found = getattr(importlib.import_module(module_name), name, None)
    except ImportError:
        return False
    defined_in = getattr(found, "__module__", None) or ""
    return callable(found) and defined_in.split(".")[0] == PROJECT_PACKAGE


def runs_command(value: str) -> bool:
    """Whether webdataset's gopen would run a shell for one of the URLs `value` stands for (it splits
    `::` lists and expands braces first)."""
    from braceexpand import braceexpand

    try:
        return any(_scheme(url) == "pipe" for part in value.split("::") for url in braceexpand(part))
    except ValueError:  # unbalanced braces: webdataset cannot expand it either
        return False


def _scheme(url: str) -> str:
    try:
        return urlparse(url).scheme
    except ValueError:  # gopen cannot parse it either
        return ""
