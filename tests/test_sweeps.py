"""Hydra multiruns: DDP jobs that do not nest sweeps, Optuna searches, the metric train.py returns."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_DATA, TINY_MODEL, run_cli
from tests.helpers import finished_wandb_records
from vlm.config import optimized_metric, single_job_argv
from vlm.training.tracking import run_name

TINY_RUN = [
    *TINY_DATA,
    *TINY_MODEL,
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.enable_progress_bar=false",
    "generation.max_new_tokens=4",
    "test=false",
]


def last_metric(job_dir: Path, name: str) -> float:
    rows = list(csv.DictReader((job_dir / "csv" / "metrics.csv").open()))
    return float(next(row[name] for row in reversed(rows) if row.get(name)))


def test_ddp_multirun_runs_each_job_once_with_its_ranks_in_the_job_dir(tmp_path, data_dir):
    """Lightning starts ranks > 0 by re-running the command line; with -m that used to start the whole
    sweep again in each child (new multirun dirs, duplicated jobs) and leave the next job's launch to the
    exited ranks of the previous one."""
    log_dir, record = tmp_path / "logs", tmp_path / "record"
    proc = run_cli(
        "train.py",
        "-m",
        "seed=1,2",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "logger=csv",
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={log_dir}",
        *TINY_RUN,
        "+callbacks.record._target_=tests.helpers.ProcessRecorder",
        f"+callbacks.record.out_dir={record}",
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((log_dir / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1 and not (log_dir / "train" / "runs").exists(), sorted(log_dir.rglob("*"))
    sweep = sweeps[0]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert [p.parent for p in log_dir.rglob("multirun.yaml")] == [sweep]  # no nested sweep anywhere
    records = [json.loads(p.read_text()) for p in record.glob("*.json")]
    assert len(records) == 4, records  # 2 jobs x 2 ranks, nothing repeated
    for job, seed in (("0", 1), ("1", 2)):
        job_dir = sweep / job
        ranks = sorted((r["rank"], r["mode"]) for r in records if r["output_dir"] == str(job_dir))
        assert ranks == [(0, "MULTIRUN"), (1, "RUN")], records
        assert {r["seed"] for r in records if r["output_dir"] == str(job_dir)} == {seed}
        assert (job_dir / "checkpoints" / "last.ckpt").is_file()
        assert last_metric(job_dir, "val/cer") >= 0
        assert f"seed={seed}" in (job_dir / ".hydra" / "overrides.yaml").read_text()
    assert len({r["pid"] for r in records if r["rank"] == 1}) == 2  # one rank-1 process per job


def test_an_optuna_search_returns_the_best_trial(tmp_path, data_dir, monkeypatch):
    """Two trials of conf/hparams_search/lr_search.yaml, without -m (the search config asks for a multirun),
    each logging to its own offline W&B run in the sweep's group."""
    log_dir = tmp_path / "logs"
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # W&B stages its tables there
    proc = run_cli(
        "train.py",
        "hparams_search=lr_search",
        "hydra.sweeper.n_trials=2",
        "logger=many",
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={log_dir}",
        *TINY_RUN,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (log_dir / "train" / "multiruns").iterdir()
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    returned = {job: last_metric(sweep / job, "val/cer") for job in ("0", "1")}
    best_job = min(returned, key=returned.get)
    assert results["best_value"] == pytest.approx(returned[best_job])
    overrides = yaml.safe_load((sweep / best_job / ".hydra" / "overrides.yaml").read_text())
    best_lr = next(float(o.split("=")[1]) for o in overrides if o.startswith("optim.lr="))
    assert results["best_params"]["optim.lr"] == pytest.approx(best_lr)
    assert 1e-4 <= best_lr <= 1e-2
    for job in ("0", "1"):
        (run,) = (sweep / job / "wandb").glob("offline-run-*")
        info = next(r.run for r in finished_wandb_records(run) if r.WhichOneof("record_type") == "run")
        assert info.run_group == f"train/multiruns/{sweep.name}"
        job_overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        assert info.display_name == run_name("train", job_overrides, int(job))
        assert "optim.lr=" in info.display_name and "hparams_search:lr_search" in info.tags


def test_optimized_metric_is_the_named_one_or_a_clear_error():
    metrics = {"val/cer": 0.5, "eval/cer": 0.25, "train/loss": 2.0}
    assert optimized_metric(metrics, "train/loss") == 2.0
    assert optimized_metric(metrics, None) == 0.25  # the default: eval/cer, else val/cer
    assert optimized_metric({"val/cer": 0.5}, None) == 0.5
    with pytest.raises(ValueError, match=r"optimized_metric=val/wer .*: eval/cer, train/loss, val/cer"):
        optimized_metric(metrics, "val/wer")


def test_a_sweep_job_alone_keeps_the_options_and_drops_the_sweep():
    argv = ["train.py", "-m", "--config-name", "train", "seed=1,2", "stage='1'", "hydra.sweep.dir=/s"]
    hydra_overrides = ["hydra.sweep.dir=/s", "hydra.mode=MULTIRUN", "hydra.job.chdir=true"]
    job = single_job_argv(argv, hydra_overrides, ["seed=2", "stage='1'"])
    assert job == [
        "train.py",
        "--config-name",
        "train",
        "hydra.job.chdir=true",
        "hydra.mode=RUN",
        "seed=2",
        "stage='1'",
    ]
