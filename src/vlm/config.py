"""Hydra glue: config location, resolvers, integer-named options, composing outside the CLI, sweep jobs."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict, read_write


def find_config_dir(package_dir: Path | None = None) -> Path:
    """The Hydra configs for the package at `package_dir` (default: this one, `vlm`).

    Run from a source checkout (an editable install, or `src` on the path) they are the checkout's `conf/`,
    the source of truth; a regular install (`pip install .`, a wheel) carries a copy as `vlm/conf/`
    (pyproject.toml maps `conf/` into the package)."""
    package_dir = Path(__file__).resolve().parent if package_dir is None else Path(package_dir)
    checkout = package_dir.parent.parent  # <repository>/src/vlm -> <repository>
    candidates = [package_dir / "conf"]
    if package_dir.parent.name == "src" and (checkout / "pyproject.toml").is_file():
        candidates.insert(0, checkout / "conf")
    for candidate in candidates:
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"no Hydra configs (train.yaml) in {' or '.join(map(str, candidates))}: install the package with"
        " `pip install .` or `pip install -e .` from the repository, whose conf/ it ships as vlm/conf/"
    )


CONFIG_DIR = find_config_dir()

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


def add_data_settings(argv: list[str]) -> list[str]:
    """eval.py's command line: `data.<key>=VALUE` -> `++data.<key>=VALUE`. eval.yaml's `data` starts empty
    (a checkpoint's data config, or `data_config`'s, fills the rest), and Hydra adds keys to it only with `+`."""
    return [f"++{arg}" if arg.startswith("data.") and "=" in arg else arg for arg in argv]


def finalize(cfg: DictConfig) -> DictConfig:
    """Resolve `auto` choices that depend on the machine."""
    if "trainer" in cfg and cfg.trainer.get("precision") == "auto":
        gpu = cfg.trainer.get("accelerator") in ("gpu", "cuda") or (
            cfg.trainer.get("accelerator") == "auto" and torch.cuda.is_available()
        )
        with open_dict(cfg):
            cfg.trainer.precision = "bf16-mixed" if gpu else "32-true"
    return cfg


def optimized_metric(metrics: dict, name: str | None) -> float | None:
    """What train.py returns to the sweeper: the metric `name`, or by default eval/cer after testing,
    else val/cer, else nothing."""
    if name is None:
        return metrics.get("eval/cer", metrics.get("val/cer"))
    if name not in metrics:
        available = ", ".join(sorted(metrics)) or "none (no validation or test ran)"
        raise ValueError(f"optimized_metric={name} is not among this run's metrics: {available}")
    return float(metrics[name])


# Environment variables Lightning's subprocess launcher sets in the process that starts the DDP ranks
DDP_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Hydra overrides that belong to the sweep (or that Lightning sets itself): not repeated for a job's ranks
SWEEP_ONLY_OVERRIDES = (
    "hydra.mode",
    "hydra.sweep",
    "hydra.sweeper",
    "hydra/sweeper",
    "hydra.launcher",
    "hydra/launcher",
    "hydra.run",
    "hydra.job.name",
    "hydra.output_subdir",
)


@contextlib.contextmanager
def sweep_job() -> Iterator[None]:
    """One job of a Hydra multirun that may start its own DDP ranks (a no-op in a single run).

    Lightning starts ranks > 0 by running `sys.argv` again with `hydra.run.dir=<hydra.run.dir>` added.
    In a multirun that command holds `-m` and the whole sweep, so every rank would start a sweep of its
    own in a new directory. Here it becomes this job alone (its overrides, single-run mode) and the run
    dir this job's sweep subdir. Afterwards the process group and the launcher's variables go, so the
    next job of the sweep launches its ranks again instead of reusing the exited ones.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hydra_cfg = HydraConfig.get()
    argv, env = sys.argv, {name: os.environ.get(name) for name in DDP_LAUNCH_ENV}
    sys.argv = single_job_argv(argv, list(hydra_cfg.overrides.hydra), list(hydra_cfg.overrides.task))
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        launched_here = env["LOCAL_RANK"] is None  # torchrun's ranks run every job together: keep their group
        if launched_here and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def single_job_argv(argv: list[str], hydra_overrides: list[str], task_overrides: list[str]) -> list[str]:
    """The command line of one sweep job run alone: the script's options (config name or dir) without
    `-m`, the job's own overrides in place of the swept ones, `hydra.mode=RUN`."""
    from hydra._internal.utils import get_args_parser

    swept = set(get_args_parser().parse_args(argv[1:]).overrides)
    options = [arg for arg in argv[1:] if arg not in swept and arg not in ("-m", "--multirun")]
    kept = [o for o in hydra_overrides if not o.lstrip("+~").startswith(SWEEP_ONLY_OVERRIDES)]
    return [argv[0], *options, *kept, "hydra.mode=RUN", *task_overrides]


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
