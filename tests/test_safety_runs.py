"""Nothing lost: a killed run, a killed save, a resume into the same directory, a diverging loss, bad config
values (vlm.training.checkpointing, checks, callbacks.NonFiniteLoss)."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from tests.conftest import ROOT, TINY_DATA, TINY_MODEL, run_cli
from vlm.app.run import train
from vlm.config import CONFIG_DIR, compose
from vlm.files import atomic_write
from vlm.training.builders import build_trainer
from vlm.training.callbacks import NonFiniteLoss
from vlm.training.checkpointing import AtomicCheckpointIO, resume_path
from vlm.training.checks import check_config
from vlm.training.module import VLMModule

QUICK = ["test=false", "generation.max_new_tokens=2", "trainer.enable_progress_bar=false"]
CLI = [*QUICK, "logger=csv", *TINY_DATA, *TINY_MODEL]  # what make_cfg adds in-process


class BlockingPickle:
    """Pickling it writes `marker` and sleeps: a `torch.save` of a checkpoint holding it never ends."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        Path(self.marker).write_text("saving")
        time.sleep(600)
        return (str, ())


class BlockSavesFrom(L.Callback):
    """For the killed process: every checkpoint from step `step` on holds a `BlockingPickle`."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step >= self.step:
            checkpoint["blocking"] = BlockingPickle(self.marker)


def metric_rows(run: Path) -> list[dict]:
    with (run / "csv" / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def train_losses(rows: list[dict]) -> dict[int, list[str]]:
    losses: dict[int, list[str]] = {}
    for row in rows:
        if row.get("train/loss"):
            losses.setdefault(int(float(row["step"])), []).append(row["train/loss"])
    return losses


# -- a killed run ------------------------------------------------------------------------------------
def test_kill_during_a_save_keeps_last_ckpt_and_resume_keeps_the_early_metrics(tmp_path, data_dir, make_cfg):
    """kill -9 while last.ckpt is being rewritten at the second validation (step 4): the last.ckpt of the
    first validation (step 2) is whole, the cut write is a temporary file beside it (not in $TMPDIR, on
    another file system here), and `ckpt_path=last` in the same run dir trains steps 2-5 only, keeping the
    killed run's metrics of steps 0-1."""
    run, marker, steps = tmp_path / "run", tmp_path / "saving", 6
    other_fs = tempfile.mkdtemp(dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else tmp_path)
    command = [
        sys.executable,
        "train.py",
        *CLI,
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run}",
        "~callbacks.model_checkpoint",  # last.ckpt is the only file written at a validation
        "+callbacks.block._target_=tests.test_safety_runs.BlockSavesFrom",
        "+callbacks.block.step=4",
        f"+callbacks.block.marker={marker}",
    ]
    env = {**os.environ, "TMPDIR": other_fs, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    with (tmp_path / "train.log").open("w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()  # SIGKILL, in the middle of the save when the marker is there
        proc.wait(timeout=60)
    assert marker.exists(), (tmp_path / "train.log").read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL
    checkpoints = run / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 2
    assert len(list(checkpoints.glob(".last.ckpt.*.tmp"))) == 1  # the cut write, beside its destination
    staged = os.listdir(other_fs)
    shutil.rmtree(other_fs)
    assert staged == []
    killed = train_losses(metric_rows(run))
    assert sorted(killed) == [0, 1, 2, 3]

    keys = tmp_path / "keys"
    train(
        make_cfg(
            *QUICK,
            f"trainer.max_steps={steps}",
            "trainer.val_check_interval=2",
            "trainer.log_every_n_steps=1",
            "ckpt_path=last",  # make_cfg's run dir is the killed run's
            "+callbacks.keys._target_=tests.helpers.KeyRecorder",
            f"+callbacks.keys.out_dir={keys}",
        )
    )
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == steps
    assert len(json.loads((keys / "keys_rank0.json").read_text())) == (steps - 2) * 8  # from step 2 on
    assert not list(checkpoints.glob(".*.tmp"))  # removed by the next write of last.ckpt
    resumed = train_losses(metric_rows(run))
    assert {step: len(rows) for step, rows in resumed.items()} == dict.fromkeys(range(steps), 1)
    assert all(resumed[step] == killed[step] for step in (0, 1))  # the killed run's rows, kept


def test_ckpt_path_that_finds_no_checkpoint_is_an_error(make_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last: no last\*\.ckpt in .*checkpoints"):
        train(make_cfg("ckpt_path=last"))
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=.*missing\.ckpt does not exist"):
        train(make_cfg(f"ckpt_path={tmp_path / 'missing.ckpt'}"))
    folder = tmp_path / "checkpoints"
    assert resume_path("last_if_any", folder) is None  # a requeued job's first start
    folder.mkdir()
    for name in ["last.ckpt", "last-v1.ckpt", ".last.ckpt.0123.tmp"]:  # the temporary file is the newest
        (folder / name).write_bytes(b"")
        time.sleep(0.01)
    assert resume_path("last", folder) == str(folder / "last-v1.ckpt")


def test_checkpoint_files_are_replaced_atomically(make_cfg, tmp_path):
    cfg = make_cfg()
    assert isinstance(build_trainer(cfg, module=VLMModule(cfg)).strategy.checkpoint_io, AtomicCheckpointIO)
    path = tmp_path / "sub" / "file.ckpt"
    atomic_write(path, lambda file: file.write(b"new"))
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["file.ckpt"]
    assert path.stat().st_mode == reference.stat().st_mode  # the umask's permissions, not 0600


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning runs FSDP on GPUs only")
def test_fsdp_checkpoints_are_replaced_atomically(make_cfg, tmp_path):
    cfg = make_cfg(
        "trainer=fsdp", "trainer.devices=1", "trainer.max_steps=2", "trainer.val_check_interval=2", *QUICK
    )
    module = VLMModule(cfg)
    assert isinstance(build_trainer(cfg, module=module).strategy.checkpoint_io, AtomicCheckpointIO)
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))


# -- a diverging loss --------------------------------------------------------------------------------
def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path, data_dir):
    """A huge learning rate: the loss is infinite at step 1; the run stops there with an error, before the
    validation at step 2 could save the damaged model as the best."""
    run = tmp_path / "run"
    proc = run_cli(
        "train.py",
        *CLI,
        "optim.lr=1e30",
        "optim.warmup_steps=1",
        "trainer.max_steps=6",
        "trainer.val_check_interval=2",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run}",
        timeout=180,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert (
        "non-finite training loss at step 1 (1 step(s) in a row, callbacks.non_finite_loss.patience=0)"
        in output
    )
    assert not list(run.glob("checkpoints/*.ckpt"))


def test_non_finite_steps_within_patience_are_skipped():
    callback = NonFiniteLoss(patience=1)
    trainer = SimpleNamespace(
        global_step=7, strategy=SimpleNamespace(reduce_boolean_decision=lambda d, all: d)
    )
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(layer.parameters())

    def step(loss: float) -> None:
        layer(torch.ones(2)).sum().backward()
        callback.on_before_backward(trainer, None, torch.tensor(loss))
        callback.on_before_optimizer_step(trainer, None, optimizer)

    with pytest.warns(UserWarning, match="non-finite training loss at step 7: step skipped"):
        step(float("nan"))
    assert all(p.grad is None for p in layer.parameters())  # skipped: AdamW leaves the layer alone
    step(1.0)
    assert all(p.grad is not None for p in layer.parameters())
    with pytest.warns(UserWarning):
        step(float("inf"))
    with pytest.raises(FloatingPointError, match=r"at step 7 \(2 step\(s\) in a row"):
        step(float("nan"))


# -- bad config values -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_steps=abc", r"trainer\.max_steps='abc': must be an integer >= 1"),
        ("trainer.val_check_interval=0", r"trainer\.val_check_interval=0: must be an integer >= 1"),
        ("data.batch_size=0", r"data\.batch_size=0: must be an integer >= 1"),
        ("data.source.samples_per_shard=0", r"data\.source\.samples_per_shard=0: must be an integer >= 1"),
        ("llm.lora.r=-1", r"llm\.lora\.r=-1: must be an integer >= 0"),
        ("loss.prompt_lm_weight=-1", r"loss\.prompt_lm_weight=-1: must be a number >= 0"),
        ("llm.tokenizer_vocab_size=100", r"llm\.tokenizer_vocab_size=100: must be an integer >= 260"),
        ("encoder.image_size=[0,512]", r"encoder\.image_size=\[0, 512\]: must be \[height, width\]"),
        ("data.source.image_size=[0,512]", r"data\.source\.image_size=\[0, 512\]: must be \[height, width\]"),
        ("callbacks.preemption.signals=[SIGTERM,SIGKILL]", r"signals=.*: SIGKILL cannot be caught"),
        ("callbacks.preemption.signals=[STOP]", r"signals=.*: SIGSTOP cannot be caught"),
    ],
)
def test_bad_config_values_are_named_at_start_up(override, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        check_config(compose("train", [f"hydra.run.dir={tmp_path}", override]))


def test_shipped_configs_pass_the_checks():
    experiments = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
    for overrides in [[], ["sizes=tiny"], *([f"experiment={name}"] for name in experiments)]:
        check_config(compose("train", overrides))


def test_bad_config_value_stops_the_cli_before_anything_is_built(tmp_path):
    data = tmp_path / "data"
    proc = run_cli(
        "train.py", "data.batch_size=0", f"paths.data_dir={data}", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert proc.returncode != 0
    assert "data.batch_size=0: must be an integer >= 1" in proc.stdout + proc.stderr
    assert not data.exists()  # no data rendered, no model built
