"""W&B runs: names, tags, metric sections, the validation samples table, system metrics, crashes."""

import contextlib
import json
import time
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from PIL import Image

from tests.helpers import finished_wandb_records, wandb_records
from vlm.app.run import train
from vlm.metrics import corpus_cer
from vlm.training.tracking import (
    NAME_LIMIT,
    SECTIONS,
    STEP_METRIC,
    run_name,
    run_tags,
    sweep_group,
    wandb_logger,
)

WANDB_RUN = [
    "logger=wandb",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "generation.max_new_tokens=8",
]


@pytest.fixture(autouse=True)
def wandb_data_dir(tmp_path, monkeypatch):
    """W&B stages artifacts (tables with their images) in its data dir until `wandb sync`: keep it here."""
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))


def records_of(run_dir: Path, kind: str, finished: bool = True) -> list:
    records = finished_wandb_records(run_dir) if finished else wandb_records(run_dir)
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def keys_of(items) -> set[str]:
    """Top-level keys of history or summary items (W&B stores "val/cer" as nested_key ["val/cer"])."""
    return {item.nested_key[0] if item.nested_key else item.key for item in items}


def last_summary(run_dir: Path, key: str):
    updates = [i for s in records_of(run_dir, "summary") for i in s.update if list(i.nested_key) == [key]]
    return json.loads(updates[-1].value_json)


def test_run_names_keep_what_changes_the_model_and_number_sweep_jobs():
    overrides = [
        "encoder=siglip",
        "stage='1'",
        "optim.lr=0.001",
        "data.source.num_train=96",
        "paths.data_dir=/tmp/data",
        "+callbacks.keys._target_=tests.helpers.KeyRecorder",
        "logger=wandb",
        "hydra.run.dir=/tmp/run",
        "llm.path=/models/smollm2",
    ]
    assert run_name("train", overrides) == (
        "train encoder=siglip,stage=1,optim.lr=0.001,source.num_train=96,llm.path=smollm2"
    )
    assert run_name("train", ["seed=2", "optim.lr=0.00024156772025296256"], job_num=3) == (
        "train#3 seed=2,optim.lr=0.0002416"
    )
    assert run_name("eval", []) == "eval"
    long = run_name("train", [f"optim.lr{i}=0.001" for i in range(30)])
    assert len(long) == NAME_LIMIT and long.endswith("…")


def test_tags_are_the_chosen_options_and_sweeps_group_by_their_dir(make_cfg):
    make_cfg("encoder=siglip", "stage=2")
    assert run_tags(HydraConfig.get().runtime.choices) == [
        "encoder:siglip",
        "resampler:pixel_shuffle",
        "projector:mlp",
        "llm:tiny",
        "sizes:tiny",
        "data:synthetic",
        "stage:2",
        "trainer:default",
    ]
    assert (
        sweep_group("/logs/train/multiruns/2026-01-01_00-00-00", "/logs")
        == "train/multiruns/2026-01-01_00-00-00"
    )
    assert sweep_group("/elsewhere/sweep", "/logs") == "/elsewhere/sweep"


def test_a_training_run_fills_its_offline_wandb_run(make_cfg, tmp_path):
    cfg = make_cfg(*WANDB_RUN, "benchmark.limit=8", "benchmark.max_new_tokens=8")
    overrides, choices = list(HydraConfig.get().overrides.task), HydraConfig.get().runtime.choices
    metrics = train(cfg)
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (info,) = records_of(run, "run")
    assert info.display_name == run_name("train", overrides) and list(info.tags) == run_tags(choices)
    assert not info.run_group  # a single run is in no group
    steps = {m.glob_name: m.step_metric for m in records_of(run, "metric") if m.glob_name}
    assert all(steps[f"{section}/*"] == STEP_METRIC for section in SECTIONS), steps
    logged = keys_of(item for h in records_of(run, "history") for item in h.item)
    assert {"train/loss", "val/cer", "data/skipped", "eval/cer", "val/samples"} <= logged, logged
    assert last_summary(run, "val/cer") == {"min": pytest.approx(metrics["val/cer"])}
    # the samples table: the decoded validation samples with their images, references and predictions
    (artifact,) = [a for a in records_of(run, "artifact") if a.type == "run_table"]
    staged = {entry.path: Path(entry.local_path) for entry in artifact.manifest.contents}
    table = json.loads(staged["val/samples.table.json"].read_text())
    assert table["columns"] == ["key", "image", "reference", "prediction", "cer"]
    references, predictions = [row[2] for row in table["data"]], [row[3] for row in table["data"]]
    assert 8 < len(table["data"]) <= 16  # 2 batches of 8 decoded, less any sample too long to use
    assert corpus_cer(predictions, references) == pytest.approx(metrics["val/cer"])  # all of them
    height, width = cfg.encoder.image_size  # tiny encoder: the rendered lines at their own size
    for row in table["data"]:
        with Image.open(staged[row[1]["path"]]) as image:
            assert image.mode == "RGB" and image.size == (width, height)
    (exit_record,) = records_of(run, "exit")
    assert exit_record.exit_code == 0


def test_runs_record_system_metrics(tmp_path, monkeypatch):
    """W&B's system monitor stays on in our runs. It samples on its own clock and the run file is written
    in blocks, so the test waits for the samples (on a loaded machine the per-process ones come in later
    records than the system-wide ones) instead of hoping a short run lasts long enough."""
    monkeypatch.setenv("WANDB_X_STATS_SAMPLING_INTERVAL", "0.1")
    logger = wandb_logger("train", project="vlm", save_dir=str(tmp_path), offline=True)
    run = logger.experiment
    wanted = {"cpu", "memory_percent", "proc.memory.rssMB"}  # system-wide and per-process samples
    run_dir, deadline, stats = Path(run.dir).parent, time.monotonic() + 120, set()
    while not wanted <= stats and time.monotonic() < deadline:  # they may come in separate records
        time.sleep(0.5)
        with contextlib.suppress(Exception):  # a block may be half written
            stats = {item.key for s in records_of(run_dir, "stats", finished=False) for item in s.item}
    run.finish()
    stats = {item.key for s in records_of(run_dir, "stats") for item in s.item}
    assert wanted <= stats, stats


def test_a_crashed_run_closes_its_wandb_run_as_failed(make_cfg, tmp_path):
    import wandb

    cfg = make_cfg(
        *WANDB_RUN, "+callbacks.crash._target_=tests.helpers.RaiseAtStep", "+callbacks.crash.step=2"
    )
    with pytest.raises(RuntimeError, match="forced failure at step 2"):
        train(cfg)
    assert wandb.run is None  # finished: the next job of a sweep starts a run of its own
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (exit_record,) = records_of(run, "exit")
    assert exit_record.exit_code == 1
    # what it logged before the crash (step 1) is in its file
    assert "train/loss" in keys_of(item for h in records_of(run, "history") for item in h.item)
