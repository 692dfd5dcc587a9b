"""Hydra glue: config location, resolvers, integer-named options, composing outside the CLI."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"

OmegaConf.register_new_resolver(
    "wandb_offline", lambda: os.environ.get("WANDB_MODE", "offline") != "online", replace=True
)

# Config groups whose options are named by integers (stage=1). Hydra's override grammar parses `1` as an
# int and refuses it as a group option, so `stage=1` and `stage=1,2` are quoted before Hydra sees them.
INTEGER_NAMED_GROUPS = ("stage",)
_INTEGER_OPTION = re.compile(rf"^((?:\+|~)?(?:{'|'.join(INTEGER_NAMED_GROUPS)}))=(\d+(?:,\d+)*)$")


def quote_integer_options(argv: list[str]) -> list[str]:
    """`stage=1` -> `stage='1'`, `stage=1,2` -> `stage='1','2'`; everything else unchanged."""
    quoted = []
    for arg in argv:
        match = _INTEGER_OPTION.match(arg)
        if match:
            arg = match.group(1) + "=" + ",".join(f"'{v}'" for v in match.group(2).split(","))
        quoted.append(arg)
    return quoted


def finalize(cfg: DictConfig) -> DictConfig:
    """Resolve `auto` choices that depend on the machine."""
    if "trainer" in cfg and cfg.trainer.get("precision") == "auto":
        gpu = cfg.trainer.get("accelerator") in ("gpu", "cuda") or (
            cfg.trainer.get("accelerator") == "auto" and torch.cuda.is_available()
        )
        with open_dict(cfg):
            cfg.trainer.precision = "bf16-mixed" if gpu else "32-true"
    return cfg


def compose(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """Compose a config as the CLI would, with `hydra.runtime` set (for tests and scripts)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(
            config_name, overrides=quote_integer_options(list(overrides or [])), return_hydra_config=True
        )
    with read_write(cfg.hydra), open_dict(cfg):
        output_dir = cfg.hydra.run.dir
        cfg.hydra.runtime.output_dir = output_dir
        cfg.hydra.runtime.cwd = os.getcwd()
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as under @hydra.main, where the node lives only in HydraConfig
    return finalize(cfg)
