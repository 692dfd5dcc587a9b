"""The commands a user types, run as subprocesses."""

import json

from tests.conftest import TINY_DATA, TINY_MODEL, run_cli


def test_train_cfg_job_prints_the_composed_config():
    proc = run_cli("train.py", "encoder=deepencoder", "stage=1", "trainer.devices=8", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert (
        "_target_: vlm.models.encoders.deepencoder.DeepEncoder" in proc.stdout and "devices: 8" in proc.stdout
    )
    assert "name: '1'" in proc.stdout


def test_unknown_option_lists_the_available_ones():
    proc = run_cli("train.py", "encoder=nope", "--cfg", "job")
    assert proc.returncode != 0
    assert "Could not find 'encoder/nope'" in proc.stderr and "deepencoder" in proc.stderr


def test_multirun_sweeps_stages(tmp_path, data_dir):
    proc = run_cli(
        "train.py",
        "-m",
        "stage=1,2",
        "debug=fast_dev_run",
        "logger=csv",
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={tmp_path}",
        *TINY_DATA,
        *TINY_MODEL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "0" / ".hydra" / "overrides.yaml").read_text().count("stage='1'") == 1
    assert "stage='2'" in (tmp_path / "1" / ".hydra" / "overrides.yaml").read_text()


def test_ddp_on_cpu_ranks_see_disjoint_samples(tmp_path, data_dir):
    keys_dir = tmp_path / "keys"
    proc = run_cli(
        "train.py",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "test=false",
        "logger=csv",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *TINY_DATA,
        *TINY_MODEL,
        "+callbacks.keys._target_=tests.helpers.KeyRecorder",
        f"+callbacks.keys.out_dir={keys_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((keys_dir / f"keys_rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3 * 8
    assert not set(ranks[0]) & set(ranks[1])


def test_sweep_over_encoders_runs_every_job_and_fails_only_the_impossible_one(tmp_path, data_dir):
    proc = run_cli(
        "train.py",
        "-m",
        "encoder=siglip,blip2,deepencoder",
        "resampler=identity,pixel_shuffle",
        "sizes=tiny",
        "trainer.max_steps=1",
        "generation.max_new_tokens=4",
        "logger=csv",
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={tmp_path}",
        *TINY_DATA,
    )
    # jobs: 0 siglip+identity, 1 siglip+pixel_shuffle, 2 blip2+identity, 3 blip2+pixel_shuffle, 4, 5 deepencoder
    for job in (0, 1, 2, 4, 5):
        assert (tmp_path / str(job) / "eval" / "metrics.json").is_file(), (job, proc.stderr[-3000:])
    assert not (tmp_path / "3" / "eval").exists()
    assert proc.returncode != 0  # Hydra runs every job, then reports the failed one
    assert "overrides: ['encoder=blip2', 'resampler=pixel_shuffle'" in proc.stderr
    assert "encoder=blip2 (32x32 image -> 32 tokens (no spatial grid) of width 64)" in proc.stderr
    assert "resampler=pixel_shuffle folds or pools neighbouring patches" in proc.stderr
