import os
import subprocess
import sys
from pathlib import Path

# offline before anything imports huggingface_hub or wandb (they read these when imported), so plain
# `pytest` never waits on the network
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(OFFLINE_ENV)

import pytest  # noqa: E402

from vlm.config import compose  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# small data and model so a training step takes milliseconds
TINY_DATA = [
    "data.source.num_train=96",
    "data.source.num_val=16",
    "data.source.num_test=16",
    "data.source.samples_per_shard=16",
    "data.num_workers=0",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "data.val_samples=16",
    "data.shuffle_buffer=16",
]
TINY_MODEL = ["sizes=tiny"]  # conf/encoder_sizes/<encoder>_tiny.yaml, conf/llm_sizes/<llm>_tiny.yaml


@pytest.fixture(autouse=True, scope="session")
def offline_env():
    os.environ.update(OFFLINE_ENV)  # again, in case something imported earlier changed them


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Shared across tests: each data recipe is rendered once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def make_cfg(tmp_path, data_dir):
    def make(*overrides: str, config: str = "train", tiny: bool = True):
        base = [f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'run'}", "logger=csv"]
        if config == "train" and tiny:
            base += TINY_DATA + TINY_MODEL
        return compose(config, [*base, *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, data_dir) -> Path:
    """A tiny model trained for two steps on the built-in data (shared by the evaluation tests)."""
    from vlm.app.run import train

    run = tmp_path_factory.mktemp("tiny_run")
    overrides = [f"paths.data_dir={data_dir}", f"hydra.run.dir={run}", "logger=csv", *TINY_DATA, *TINY_MODEL]
    train(compose("train", [*overrides, "trainer.max_steps=2", "trainer.val_check_interval=2", "test=false"]))
    return next((run / "checkpoints").glob("step*.ckpt"))


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python <args>` in the repo like a user would; fail with its output on a non-zero exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc
