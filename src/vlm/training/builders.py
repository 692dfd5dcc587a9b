"""The datamodule and the Trainer a run config describes, for a built model (used by the app's runs,
`vlm.bench` and the OCR baseline)."""

from __future__ import annotations

import functools
import sys

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from vlm.data.datamodule import ShardDataModule
from vlm.data.processing import SampleProcessor
from vlm.models.vlm import VisionLanguageModel
from vlm.training.checkpointing import AtomicCheckpointIO
from vlm.training.distributed import trainer_arguments


def build_datamodule(data_cfg: DictConfig, model: VisionLanguageModel, max_length: int) -> ShardDataModule:
    """The configured datamodule, processing samples for this model's encoder and tokenizer."""
    factory = functools.partial(SampleProcessor.for_model, model, max_length)
    return instantiate(data_cfg, processor_factory=factory, pad_id=model.tokenizer.pad_id)


def build_trainer(
    cfg: DictConfig, callbacks: bool = True, module: L.LightningModule | None = None
) -> L.Trainer:
    """The configured Trainer; `trainer=fsdp` builds its strategy from `module` (vlm.training.distributed).
    Checkpoint files are replaced atomically (vlm.training.checkpointing)."""
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
    cbs = [instantiate(c) for c in cfg.callbacks.values()] if callbacks and "callbacks" in cfg else []
    trainer_cfg, built = trainer_arguments(cfg, module)
    cbs += built.pop("callbacks", [])
    return instantiate(
        trainer_cfg, logger=loggers or False, callbacks=cbs, plugins=[AtomicCheckpointIO()], **built
    )


def close_loggers(loggers) -> None:
    """Finish W&B runs even after a crash, so one failed job does not break a sweep. Called in a `finally`:
    an exception on its way up marks the run failed (exit code 1) and still writes out its files."""
    failed = sys.exc_info()[0] is not None
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish(exit_code=1 if failed else 0)
