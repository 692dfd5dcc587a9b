"""What train.py and eval.py do, callable from tests with a composed config."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from vlm.config import CONFIG_DIR
from vlm.data.datamodule import ShardDataModule
from vlm.eval.runner import run_benchmark
from vlm.training.builders import build_datamodule, build_trainer, close_loggers
from vlm.training.checkpointing import (
    ResumableCSVLogger,
    checkpoint_step,
    init_parts,
    load_module,
    resume_path,
)
from vlm.training.checks import check_config
from vlm.training.module import VLMModule, count_parameters

log = logging.getLogger(__name__)


def evaluate(
    trainer: L.Trainer,
    module: VLMModule,
    datamodule: ShardDataModule | None,
    benchmark,
    output_dir: Path,
    ckpt_path: str | None = None,
) -> dict:
    """Generate the benchmark's answers with the model, score them, write the files (vlm.eval.runner)."""
    return run_benchmark(
        benchmark, output_dir, trainer=trainer, module=module, datamodule=datamodule, ckpt_path=ckpt_path
    )


def train(cfg: DictConfig) -> dict:
    """Fit, then evaluate the best checkpoint; returns the final metrics (for sweepers). Config values and
    `ckpt_path` are checked first (vlm.training.checks, vlm.training.checkpointing.resume_path)."""
    check_config(cfg)
    ckpt_path = resume_path(cfg.get("ckpt_path"), Path(cfg.paths.output_dir) / "checkpoints")
    L.seed_everything(cfg.seed, workers=True)
    module = VLMModule(cfg)
    init = cfg.get("init_from") or {}
    if init.get("ckpt"):
        init_parts(module, init.ckpt, list(init.parts))
        log.info("init_from: %s from %s", ", ".join(init.parts), init.ckpt)
    total, trainable = count_parameters(module.model)
    log.info(
        "model: %s parameters, %s trainable; frozen: %s\n%s",
        f"{total:,}",
        f"{trainable:,}",
        module.frozen or "nothing",
        module.model.describe(),
    )
    datamodule = build_datamodule(cfg.data, module.model, cfg.max_length)
    trainer = build_trainer(cfg, module=module)
    for logger in trainer.loggers:
        if isinstance(logger, ResumableCSVLogger):  # keeps the rows of the steps the checkpoint holds
            logger.resume_step = checkpoint_step(ckpt_path) if ckpt_path else 0
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v)}
        if cfg.get("test") and not trainer.fast_dev_run:
            best = getattr(trainer.checkpoint_callback, "best_model_path", "")
            benchmark = instantiate(cfg.benchmark)
            result = evaluate(
                trainer,
                module,
                datamodule,
                benchmark,
                Path(cfg.paths.output_dir) / "eval",
                ckpt_path=best or None,
            )
            metrics.update({f"eval/{k}": v for k, v in result.items()})
            datamodule.log_summary()  # samples read and skipped
    finally:
        close_loggers(trainer.loggers)
    return metrics


def datamodule_without_checkpoint(cfg: DictConfig) -> ShardDataModule:
    """The data of `data_config` (conf/data/<name>.yaml) with eval.py's `data.<key>=` settings, as train.py
    composes it: it names, and renders on first use, each split's shards; with no model it processes no
    samples."""
    recipe = CONFIG_DIR / "data" / f"{cfg.data_config}.yaml"
    if not recipe.is_file():
        options = ", ".join(sorted(path.stem for path in recipe.parent.glob("*.yaml")))
        raise ValueError(f"data_config={cfg.data_config}: no {recipe}; options: {options}")
    composed = cfg.copy()
    with open_dict(composed):  # in the whole config, so that ${paths.data_dir} and ${seed} resolve
        composed.data = OmegaConf.merge(OmegaConf.load(recipe), cfg.data)
    return instantiate(composed.data, processor_factory=None, pad_id=0)


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    """eval.py: score `predictions=` as they are, or rebuild the model from the checkpoint's own config
    (checked: vlm.checkpoint) and generate. With both, the checkpoint only supplies the tokenizer and
    vision-token count. `data.<key>=` settings replace the checkpoint's (its paths are the training
    machine's); without a checkpoint they apply to `data_config`, whose splits are rebuilt as train.py
    would (benchmark=synthetic reads its test split)."""
    predictions, ckpt_path = cfg.get("predictions"), cfg.get("ckpt_path")
    benchmark = instantiate(cfg.benchmark)
    output_dir = Path(cfg.paths.output_dir)
    if not predictions and not ckpt_path:
        raise ValueError(
            "eval.py needs ckpt_path=PATH (generate with that model) or predictions=DIR|FILE (score them)"
        )
    if ckpt_path and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} is not a file")
    if predictions and not Path(predictions).exists():
        raise FileNotFoundError(f"predictions={predictions} does not exist")
    module = None
    if ckpt_path:
        module = load_module(ckpt_path)
        overrides = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else {}
        data_cfg = OmegaConf.merge(module.cfg.data, overrides)
        datamodule = build_datamodule(data_cfg, module.model, module.cfg.max_length)
    else:
        datamodule = datamodule_without_checkpoint(cfg)
    if predictions:
        loggers = [instantiate(c) for c in cfg.get("logger", {}).values()]
        try:
            return run_benchmark(
                benchmark,
                output_dir,
                module=module,
                datamodule=datamodule,
                predictions_path=predictions,
                loggers=loggers,
            )
        finally:
            close_loggers(loggers)
    trainer = build_trainer(cfg, callbacks=False, module=module)
    try:
        return evaluate(trainer, module, datamodule, benchmark, output_dir)
    finally:
        close_loggers(trainer.loggers)
