"""W&B: runs named, tagged and grouped from the Hydra job, metric sections, validation samples."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from vlm.contracts import Batch
from vlm.metrics import corpus_cer

# config groups whose chosen option becomes a tag ("encoder:siglip")
TAG_GROUPS = (
    "experiment",
    "hparams_search",
    "encoder",
    "resampler",
    "projector",
    "llm",
    "sizes",
    "data",
    "stage",
    "trainer",
)
# overrides that say where and how a run logs, not what it trains: left out of its name
UNNAMED_OVERRIDES = ("paths", "hydra", "logger", "callbacks", "ckpt_path", "predictions")
SECTIONS = ("train", "val", "eval", "data", "perf")  # metric prefixes, one W&B section each
STEP_METRIC = "trainer/global_step"  # what Lightning's WandbLogger logs as the step
SUMMARIES = {"val/cer": "min", "val/loss": "min", "val/exact_match": "max", "train/loss": "min"}
NAME_LIMIT, TAG_LIMIT, GROUP_LIMIT = 128, 64, 128  # W&B's display limits


def run_name(task_name: str, overrides: Sequence[str], job_num: int | None = None) -> str:
    """`train#3 encoder=siglip,stage=1`: the task, the sweep job's number, the overrides that change what
    is trained, shortened (`short_value`; dotted keys to their last two parts)."""
    parts = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key.split(".")[0].split("/")[0] in UNNAMED_OVERRIDES:
            continue
        value = short_value(value.strip("'\""))
        parts.append(f"{'.'.join(key.split('.')[-2:])}={value}" if value else key)
    name = task_name if job_num is None else f"{task_name}#{job_num}"
    if parts:
        name += " " + ",".join(parts)
    return name if len(name) <= NAME_LIMIT else name[: NAME_LIMIT - 1] + "…"


def short_value(value: str) -> str:
    """A path by its last part, a float to 4 significant digits (Optuna's samples have 17)."""
    if "/" in value:
        return Path(value).name
    try:
        number = float(value)
    except ValueError:
        return value
    return value if value.lstrip("-").isdigit() else f"{number:.4g}"


def run_tags(choices: dict) -> list[str]:
    """`encoder:siglip`, `stage:1`, ...: the chosen option of each group in TAG_GROUPS."""
    return [f"{group}:{choices[group]}"[:TAG_LIMIT] for group in TAG_GROUPS if choices.get(group) is not None]


def sweep_group(sweep_dir: str, log_dir: str | None) -> str:
    """The sweep's directory, relative to the log directory when inside it: its jobs share a W&B group."""
    path = Path(sweep_dir)
    if log_dir and path.is_relative_to(log_dir):
        path = path.relative_to(log_dir)
    return str(path)[-GROUP_LIMIT:]


def wandb_logger(
    task_name: str,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    log_dir: str | None = None,
    **kwargs,
) -> WandbLogger:
    """Lightning's WandbLogger with name, tags and group taken from the Hydra job unless given.
    W&B's own system metrics (CPU, GPU, memory, disk) stay on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    job_num, auto_tags = None, []
    overrides: Sequence[str] = ()
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        overrides, auto_tags = hydra_cfg.overrides.task, run_tags(hydra_cfg.runtime.choices)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            job_num = hydra_cfg.job.num
            group = group or sweep_group(hydra_cfg.sweep.dir, log_dir)
    return SectionedWandbLogger(
        name=name or run_name(task_name, overrides, job_num),
        group=group,
        tags=list(dict.fromkeys([*auto_tags, *tags])),
        **kwargs,
    )


class SectionedWandbLogger(WandbLogger):
    """Defines the metric sections when its run starts (at the first log, as Lightning starts it, so a
    job that fails before logging leaves no run behind)."""

    @property
    def experiment(self):
        started = self._experiment is not None
        run = WandbLogger.experiment.fget(self)  # a no-op stand-in on ranks > 0
        if not started and self._experiment is not None:
            define_sections(run)
        return run


def define_sections(run) -> None:
    """Every section plotted against the trainer's step, with the summaries a run table wants (best
    val/cer, not the last)."""
    run.define_metric(STEP_METRIC)
    for section in SECTIONS:
        run.define_metric(f"{section}/*", step_metric=STEP_METRIC, step_sync=True)
    for metric, summary in SUMMARIES.items():
        run.define_metric(metric, step_metric=STEP_METRIC, step_sync=True, summary=summary)


class ValidationSamples(L.Callback):
    """At each validation, a `val/samples` table in W&B: image, reference, prediction and CER of the first
    `num_samples` decoded validation samples (VLMModule.validation_step returns its decoded texts)."""

    def __init__(self, num_samples: int = 16) -> None:
        self.num_samples = num_samples
        self.rows: list[list] = []

    @staticmethod
    def _loggers(trainer: L.Trainer) -> list[WandbLogger]:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return []
        return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.rows = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if outputs is None or len(self.rows) >= self.num_samples or not self._loggers(trainer):
            return
        import wandb

        images = first_images(batch, pl_module.model.encoder.preprocessing)
        for key, image, answers, prediction in zip(
            batch["keys"], images, batch["answers"], outputs, strict=True
        ):
            if len(self.rows) == self.num_samples:
                break
            picture = wandb.Image(image) if image is not None else None
            self.rows.append([key, picture, answers[0], prediction, corpus_cer([prediction], [answers[0]])])

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        rows, self.rows = self.rows, []
        if not rows:
            return
        for logger in self._loggers(trainer):
            logger.log_table(
                key="val/samples",
                columns=["key", "image", "reference", "prediction", "cer"],
                data=rows,
                step=trainer.global_step,
            )


def first_images(batch: Batch, preprocessing) -> list[Image.Image | None]:
    """Each sample's first image as the encoder saw it (global view, normalisation undone); None for a
    sample without images."""
    views = batch["pixel_values"]
    views = getattr(views, "global_views", views).detach().float().cpu()  # TiledViews: the global view
    mean = torch.tensor(preprocessing.mean).view(3, 1, 1)
    std = torch.tensor(preprocessing.std).view(3, 1, 1)
    images, first = [], 0
    for count in batch["images_per_sample"].tolist():
        if count:
            pixels = (views[first] * std + mean).clamp(0, 1).mul(255).round().byte()  # (3, H, W)
            images.append(Image.fromarray(pixels.permute(1, 2, 0).numpy()))
        else:
            images.append(None)
        first += count
    return images
