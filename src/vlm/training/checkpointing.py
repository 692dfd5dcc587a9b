"""What a stopped run leaves for its resume: checkpoint files written atomically, `last.ckpt` at every
validation, `ckpt_path` resolved to a checkpoint (or an error), and a CSV log that a resumed run continues.

A process killed while saving leaves the previous checkpoint whole: the new one is written to a temporary
file beside it and renamed over it (`atomic_save`). The rename is atomic only within one file system, so the
temporary file is never in $TMPDIR (Lightning's own writer stages there and copies across, which a kill
cuts short). Sharded FSDP checkpoints (`trainer.fsdp.state_dict_type=sharded`) are folders written by
torch.distributed.checkpoint, outside this module.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from vlm.checkpoint import UnreadableCheckpointError, load_weights_only, read_lightning_checkpoint
from vlm.files import atomic_write
from vlm.models.llms.gpt import tokenizer_from_checkpoint
from vlm.models.llms.lora import has_lora, merge_lora
from vlm.models.llms.tokenizer import BPETokenizer
from vlm.models.pretrained import load_strict

if TYPE_CHECKING:
    from vlm.training.module import VLMModule

log = logging.getLogger(__name__)

LAST = "last"  # ckpt_path=last: the run's newest last*.ckpt, an error when there is none
LAST_IF_ANY = "last_if_any"  # the same, or a fresh start when there is none (a requeued job's command)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with local files written by `atomic_write`; remote ones (s3://, ...)
    as Lightning writes them. Every `trainer.save_checkpoint` of a single-file checkpoint goes through it:
    ModelCheckpoint, `LastCheckpoint`, the preemption callback, DDP and FSDP with full state dicts."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(path, lambda file: torch.save(checkpoint, file), remove_stale=True)


class LastCheckpoint(Checkpoint):
    """Writes `path` at the end of every validation and of training, improved or not: what `ckpt_path=last`
    resumes from. (Lightning's ModelCheckpoint with `save_top_k=0` writes its last.ckpt only at the end.)"""

    def __init__(self, path: str) -> None:
        self.path = str(path)
        self._saved_step = -1

    def _save(self, trainer: L.Trainer) -> None:
        if (
            trainer.fast_dev_run
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.global_step == self._saved_step
        ):
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # all state; every rank: the strategy writes
        self._saved_step = trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)


def resume_path(ckpt_path: str | None, checkpoint_dir: str | Path) -> str | None:
    """The checkpoint `ckpt_path` names: `last` is the newest `last*.ckpt` in `checkpoint_dir`, `last_if_any`
    the same or None (a fresh start) when there is none. Naming a checkpoint that is not there is an error,
    never a fresh start."""
    if ckpt_path is None:
        return None
    if ckpt_path in (LAST, LAST_IF_ANY):
        found = sorted(Path(checkpoint_dir).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
        if found:
            return str(found[-1])
        if ckpt_path == LAST_IF_ANY:
            log.warning("ckpt_path=%s: no last*.ckpt in %s, starting afresh", LAST_IF_ANY, checkpoint_dir)
            return None
        raise FileNotFoundError(
            f"ckpt_path={LAST}: no last*.ckpt in {checkpoint_dir} to resume from; name a checkpoint file, or "
            f"use ckpt_path={LAST_IF_ANY} to start afresh when there is none"
        )
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
    return ckpt_path


def checkpoint_step(path: str | Path) -> int:
    """The global step a checkpoint file (or sharded FSDP checkpoint folder) was written at."""
    path = Path(path)
    if path.is_dir():
        path = path / "meta.pt"  # Lightning's FSDP metadata file
    return int(load_weights_only(path, mmap=True)["global_step"])


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, keeping the rows of `metrics.csv` logged before step `keep_before`."""

    def __init__(self, log_dir: str, keep_before: int) -> None:
        self.keep_before = keep_before
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        # Lightning deletes the file here
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = [row for row in reader if float(row["step"]) < self.keep_before]
            keys = sorted(reader.fieldnames or [])
        if not rows:
            self._fs.rm_file(self.metrics_file_path)
            return
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(
            self.metrics_file_path, lambda file: file.write(text.getvalue().encode()), remove_stale=True
        )
        self.metrics_keys = keys  # appended rows follow this header (Lightning keeps it sorted)


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger that continues a resumed run's `metrics.csv`: with `resume_step` set before
    anything is logged, the rows of the steps before it stay and the later ones (a stretch trained again
    after the resume) go. The default, 0, starts the file afresh as Lightning does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = 0

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, keep_before=self.resume_step)
        return self._experiment


# -- what a checkpoint gives back ----------------------------------------------------------------
def load_module(file: str | Path, checkpoint: dict | None = None) -> VLMModule:
    """The VLMModule of a train.py checkpoint (`checkpoint`: the file already read), rebuilt from its
    checked config and the tokenizer it holds (if any), its weights loaded strictly."""
    from vlm.training.module import VLMModule

    checkpoint = checkpoint if checkpoint is not None else read_lightning_checkpoint(file)
    with tokenizer_from_checkpoint(saved_tokenizer(checkpoint, str(file))):
        module = VLMModule(checkpoint["hyper_parameters"]["cfg"])
    load_strict(module, checkpoint["state_dict"], "", str(file))
    return module


def init_parts(module: VLMModule, file: str | Path, parts: list[str]) -> None:
    """Start `parts` of `module`'s model (names among encoder, resampler, projector, llm; `all`: every one)
    from the weights of the train.py checkpoint `file`, each loaded strictly (`load_strict`): a missing,
    unexpected or mis-shaped key is an error naming it. A checkpoint whose tokenizer differs from the
    model's is refused when `llm` is among the parts (its ids would mean other strings)."""
    from vlm.training.module import PARTS

    parts = list(PARTS) if list(parts) == ["all"] else list(parts)
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise ValueError(f"init_from.parts={parts}: expected some of {', '.join(PARTS)}, or [all]")
    checkpoint = read_lightning_checkpoint(file)
    if "llm" in parts:
        to_json = getattr(module.model.tokenizer, "to_json", None)
        saved = checkpoint.get("tokenizer")
        if (to_json() if to_json else None) != saved:
            raise ValueError(
                f"init_from.ckpt={file}: its tokenizer is not this run's LLM tokenizer, so its LLM's "
                "token ids would mean other strings; train it with the same llm.tokenizer settings"
            )
    state = checkpoint["state_dict"]
    for part in parts:
        prefix = f"model.{part}."
        load_strict(
            module.model.get_submodule(part),
            {name: tensor for name, tensor in state.items() if name.startswith(prefix)},
            prefix,
            f"{file} ({part})",
        )


def saved_tokenizer(checkpoint: dict, source: str) -> BPETokenizer | None:
    """The tokenizer saved in a checkpoint (`VLMModule.on_save_checkpoint`), or None when it has none."""
    saved = checkpoint.get("tokenizer")
    if saved is None:
        return None
    try:
        return BPETokenizer.from_json(saved)
    except Exception as error:  # tokenizers raises a bare Exception for a malformed file
        raise UnreadableCheckpointError(
            f"{source}: its saved tokenizer is not a BPE tokenizer's JSON: {error}"
        ) from error


def merge_lora_checkpoint(source: str, target: str) -> None:
    """A Lightning checkpoint with LoRA adapters -> one with them merged, loadable without peft layers.
    The source is read weights-only and its config checked (vlm.checkpoint)."""
    checkpoint = read_lightning_checkpoint(source)
    module = load_module(source, checkpoint)
    if not has_lora(module.model):
        raise ValueError(f"{source} holds no LoRA adapters")
    merge_lora(module.model)
    cfg = checkpoint["hyper_parameters"]["cfg"]
    for llm_cfg in (cfg["model"]["llm"], cfg.get("llm") or {}):
        if llm_cfg.get("lora"):
            llm_cfg["lora"]["r"] = 0
    checkpoint["state_dict"] = module.state_dict()
    for key in ("optimizer_states", "lr_schedulers"):
        checkpoint.pop(key, None)  # a merged model is for evaluation, not for resuming
    torch.save(checkpoint, target)
    log.info("merged LoRA adapters of %s into %s", source, target)
