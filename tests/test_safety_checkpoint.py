"""A checkpoint and its saved config are data from a stranger: loading one runs nothing (weights-only
unpickling, a checked config), a broken file is an error that names it, and eval.py's `data.<key>=`
settings replace a copied checkpoint's data paths."""

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from tests.conftest import run_cli
from vlm.app.run import evaluate_checkpoint, train
from vlm.checkpoint import (
    UnreadableCheckpointError,
    UnsafeConfigError,
    check_saved_config,
    read_lightning_checkpoint,
)
from vlm.config import CONFIG_DIR, compose
from vlm.models.llms.nanochat import read_checkpoint
from vlm.models.pretrained import checkpoint_files, read_checkpoint_file, read_tensors
from vlm.training.checkpointing import merge_lora_checkpoint


class RunsACommand:
    """Unpickling this would run a shell command (creating `marker`)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def changed_checkpoint(source: Path, target: Path, change) -> Path:
    """A copy of the checkpoint `source` after `change(checkpoint dict)`, written to `target`."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, target)
    return target


def with_saved(key: str, value):
    """A change that sets the saved config's dotted `key` to `value`."""

    def change(checkpoint: dict) -> None:
        cfg = OmegaConf.create(checkpoint["hyper_parameters"]["cfg"])
        OmegaConf.update(cfg, key, value, force_add=True)
        checkpoint["hyper_parameters"]["cfg"] = OmegaConf.to_container(cfg)

    return change


def eval_cfg(tmp_path: Path, data_dir: Path, *overrides: str):
    return compose(
        "eval",
        [f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'eval'}", "benchmark.limit=4", *overrides],
    )


def payload_checkpoint(tiny_checkpoint: Path, tmp_path: Path, marker: Path) -> Path:
    return changed_checkpoint(
        tiny_checkpoint, tmp_path / "payload.ckpt", lambda c: c.update(payload=RunsACommand(marker))
    )


# -- pickled payloads ------------------------------------------------------------------------------
def test_eval_refuses_a_pickled_payload(tiny_checkpoint, data_dir, tmp_path):
    marker = tmp_path / "pwned"
    payload = payload_checkpoint(tiny_checkpoint, tmp_path, marker)
    with pytest.raises(
        pickle.UnpicklingError, match=rf"{re.escape(str(payload))}: it holds the global posix\.system"
    ):
        evaluate_checkpoint(eval_cfg(tmp_path, data_dir, f"ckpt_path={payload}"))
    assert not marker.exists()


def test_lora_merge_refuses_a_pickled_payload(tiny_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    payload = payload_checkpoint(tiny_checkpoint, tmp_path, marker)
    with pytest.raises(
        pickle.UnpicklingError, match=rf"{re.escape(str(payload))}: it holds the global posix\.system"
    ):
        merge_lora_checkpoint(str(payload), str(tmp_path / "merged.ckpt"))
    assert not marker.exists() and not (tmp_path / "merged.ckpt").exists()


def test_resume_reads_weights_only(tiny_checkpoint, make_cfg, tmp_path, monkeypatch):
    """Weights-only must be asked for, not left to torch's default, which the environment can switch off."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    payload = payload_checkpoint(tiny_checkpoint, tmp_path, marker)
    with pytest.raises(pickle.UnpicklingError, match=r"posix\.system"):
        train(make_cfg(f"ckpt_path={payload}", "trainer.max_steps=4", "test=false"))
    assert not marker.exists()


# -- the saved config ------------------------------------------------------------------------------
REFUSED = [
    ("model.encoder._target_", "numpy.savetxt", "model.encoder._target_"),
    ("model.projector", {"_target_": "numpy.savetxt", "_partial_": True}, "model.projector._target_"),
    ("model.llm._args_", [{"_target_": "os.system", "_args_": ["true"]}], "model.llm._args_.0._target_"),
    ("data.source._target_", "vlm.config.os.system", "data.source._target_"),  # os, imported by vlm
    ("data.source._target_", "vlm.data.tar_reading.gopen", "data.source._target_"),  # webdataset's
    ("data.source._target_", "vlm.app.bench.main", "data.source._target_"),  # a command, not a component
    ("data.source._target_", "vlm.bench.train.run", "data.source._target_"),
    (
        "data.sources",
        [{"name": "a", "train_urls": {"_target_": "builtins.exec"}}],
        "data.sources.0.train_urls._target_",
    ),
    ("data.source.root", "${oc.decode:'{_target_: numpy.savetxt}'}", "data.source.root"),
    ("data.test_urls", "pipe:touch pwned", "data.test_urls"),
    ("data.test_urls", ["a.tar", " PIPE:touch pwned"], "data.test_urls.1"),
    ("data.val_urls", "shard-{0..3}.tar::pipe:touch pwned", "data.val_urls"),
    ("data.val_urls", "{o..q}ipe:touch pwned", "data.val_urls"),  # braces make pipe:
]


@pytest.mark.parametrize(("key", "value", "named"), REFUSED)
def test_saved_config_may_not_build_outside_the_project_or_run_commands(tiny_checkpoint, key, value, named):
    cfg = OmegaConf.create(torch.load(tiny_checkpoint, weights_only=True)["hyper_parameters"]["cfg"])
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(UnsafeConfigError, match=re.escape(f"saved config's {named}=")):
        check_saved_config(OmegaConf.to_container(cfg), "x.ckpt")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("data.test_urls", "pipe:touch {marker}"),
        ("model.encoder", {"_target_": "numpy.savetxt", "fname": "{marker}", "X": [1.0]}),
    ],
)
def test_eval_builds_nothing_a_saved_config_smuggles_in(tiny_checkpoint, data_dir, tmp_path, key, value):
    marker = tmp_path / "pwned"
    value = json.loads(json.dumps(value).replace("{marker}", str(marker)))
    changed = changed_checkpoint(tiny_checkpoint, tmp_path / "changed.ckpt", with_saved(key, value))
    with pytest.raises(UnsafeConfigError, match=re.escape(f"{changed}: the saved config's {key}")):
        evaluate_checkpoint(eval_cfg(tmp_path, data_dir, f"ckpt_path={changed}"))
    assert not marker.exists()


def test_the_project_configs_pass_the_check(tiny_checkpoint):
    check_saved_config(read_lightning_checkpoint(tiny_checkpoint)["hyper_parameters"]["cfg"], "tiny")
    options = [
        f"{group}={path.stem}"
        for group in ("data", "encoder", "llm", "projector", "resampler")
        for path in sorted((CONFIG_DIR / group).glob("*.yaml"))
    ]
    for option in options:
        cfg = compose("train", [option])
        check_saved_config(OmegaConf.to_container(cfg, resolve=True), option)


# -- a copied checkpoint's data settings -----------------------------------------------------------
def test_eval_data_settings_replace_the_checkpoints(tiny_checkpoint, data_dir, tmp_path):
    elsewhere = str(tmp_path / "training-machine" / "test-*.tar")
    copied = tmp_path / "copied.ckpt"
    changed_checkpoint(tiny_checkpoint, copied, with_saved("data.source", None))
    changed_checkpoint(copied, copied, with_saved("data.test_urls", elsewhere))
    with pytest.raises(FileNotFoundError, match="training-machine"):
        evaluate_checkpoint(eval_cfg(tmp_path, data_dir, f"ckpt_path={copied}"))
    shards = next(data_dir.glob("synthetic/*/test-000000.tar"))
    proc = run_cli(
        "eval.py",
        f"ckpt_path={copied}",
        "benchmark=synthetic",
        f"data.test_urls={shards}",
        "data.eval_batch_size=2",
        "benchmark.limit=4",
        f"hydra.run.dir={tmp_path / 'cli'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics


# -- broken checkpoint files -----------------------------------------------------------------------
def truncated(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    return target


@pytest.mark.parametrize("broken", ["empty", "truncated", "not a train.py checkpoint"])
def test_a_broken_lightning_checkpoint_is_named(tiny_checkpoint, data_dir, tmp_path, broken):
    file = tmp_path / "broken.ckpt"
    if broken == "empty":
        file.write_bytes(b"")
    elif broken == "truncated":
        truncated(tiny_checkpoint, file)
    else:
        torch.save({"weights": torch.zeros(2)}, file)
    with pytest.raises(UnreadableCheckpointError, match=re.escape(str(file))):
        evaluate_checkpoint(eval_cfg(tmp_path, data_dir, f"ckpt_path={file}"))


@pytest.mark.parametrize("broken", ["empty", "truncated"])
def test_a_broken_safetensors_file_is_named(tmp_path, broken):
    file = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(64, 64)}, file)
    if broken == "empty":
        file.write_bytes(b"")
    else:
        truncated(file, file)
    with pytest.raises(UnreadableCheckpointError, match=re.escape(str(file))):
        read_checkpoint_file(file)
    with pytest.raises(UnreadableCheckpointError, match=re.escape(str(file))):
        read_tensors(str(tmp_path), ("weight",))


@pytest.mark.parametrize(
    ("index", "problem"),
    [
        ("{not json", "not a shard index"),
        ('{"metadata": {}}', "not a shard index"),
        ('{"weight_map": ["a.safetensors"]}', "not a shard index"),
        ('{"weight_map": {"weight": "model-00002.safetensors"}}', "not files next to it: model-00002"),
    ],
)
def test_a_broken_shard_index_is_named(tmp_path, index, problem):
    save_file({"weight": torch.zeros(2)}, tmp_path / "model-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(UnreadableCheckpointError, match=rf"index\.json.*{problem}"):
        checkpoint_files(str(tmp_path))


@pytest.mark.parametrize("broken", ["meta", "empty model", "truncated model"])
def test_a_broken_nanochat_checkpoint_is_named(tmp_path, broken):
    model_config = dict(sequence_len=16, vocab_size=260, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    meta, model = tmp_path / "meta_000000.json", tmp_path / "model_000000.pt"
    meta.write_text(json.dumps({"model_config": model_config}))
    torch.save({"transformer.wte.weight": torch.zeros(260, 32)}, model)
    named = model
    if broken == "meta":
        meta.write_text('{"model_config": {')
        named = meta
    elif broken == "empty model":
        model.write_bytes(b"")
    else:
        truncated(model, model)
    with pytest.raises(UnreadableCheckpointError, match=re.escape(str(named))):
        read_checkpoint(str(tmp_path))
