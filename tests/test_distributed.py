"""Many processes: DDP with frozen parts, the FSDP strategy built from the model, preemption, SLURM."""

import json
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import ROOT, TINY_DATA, TINY_MODEL, run_cli
from vlm.app.run import train
from vlm.config import CONFIG_DIR
from vlm.training.distributed import FSDPGradientClipping, block_classes, trainer_arguments
from vlm.training.module import VLMModule
from vlm.training.preemption import Preemption, parse_signals

DDP_ON_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
QUICK = ["test=false", "generation.max_new_tokens=2", "trainer.enable_progress_bar=false"]  # no evaluation
CLI = [*QUICK, "logger=csv", *TINY_DATA, *TINY_MODEL]  # what make_cfg adds in-process


def qualified(classes) -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in classes}


# -- DDP ---------------------------------------------------------------------------------------------
def test_ddp_on_cpu_trains_the_projector_and_leaves_the_frozen_parts(tmp_path, data_dir, make_cfg):
    """stage=align freezes the encoder and the LLM; DDP runs without find_unused_parameters."""
    run = tmp_path / "ddp"
    proc = run_cli(
        "train.py",
        *DDP_ON_CPU,
        "stage=align",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        *CLI,
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run}",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    L.seed_everything(0)  # as train() does before building the model
    before = VLMModule(make_cfg("stage=align")).model.state_dict()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    after = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert ckpt["global_step"] == 3
    frozen = [k for k in before if k.startswith(("encoder.", "llm."))]
    trained = [k for k in before if k.startswith("projector.")]
    assert frozen and trained
    assert [k for k in frozen if not torch.equal(before[k], after[k])] == []
    assert [k for k in trained if torch.equal(before[k], after[k])] == []


def test_ddp_strategy_goes_to_lightning_as_configured(make_cfg):
    trainer_cfg, built = trainer_arguments(make_cfg("trainer=ddp"), None)
    assert trainer_cfg["strategy"] == "ddp" and trainer_cfg["num_nodes"] == 1 and built == {}


# -- FSDP --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (
            ["encoder=siglip", "llm=smollm2_135m"],
            {
                "timm.models.vision_transformer.Block",
                "transformers.models.llama.modeling_llama.LlamaDecoderLayer",
            },
        ),
        (["llm=nanochat_d20"], {"vlm.models.encoders.tiny.EncoderBlock", "vlm.models.llms.gpt.Block"}),
    ],
)
def test_fsdp_wraps_the_block_classes_the_parts_report(make_cfg, parts, expected):
    cfg = make_cfg("trainer=fsdp", *parts)
    module = VLMModule(cfg)
    trainer_cfg, built = trainer_arguments(cfg, module)
    strategy = built["strategy"]
    assert qualified(block_classes(module)) == expected
    assert qualified(strategy.kwargs["auto_wrap_policy"]._module_classes) == expected
    assert strategy.kwargs["use_orig_params"] is True  # frozen and trainable parameters in one unit
    assert strategy.sharding_strategy.name == "FULL_SHARD" and strategy._state_dict_type == "full"
    assert strategy._activation_checkpointing_kwargs == {}  # off unless asked
    # Lightning refuses norm clipping under FSDP: the callback clips through FSDP instead
    assert "gradient_clip_val" not in trainer_cfg and "fsdp" not in trainer_cfg
    assert [(type(c), c.max_norm) for c in built["callbacks"]] == [(FSDPGradientClipping, 1.0)]


def test_fsdp_options_reach_the_strategy(make_cfg):
    cfg = make_cfg(
        "trainer=fsdp",
        "trainer.fsdp.activation_checkpointing=true",
        "trainer.fsdp.state_dict_type=sharded",
        "trainer.fsdp.sharding_strategy=SHARD_GRAD_OP",
        "trainer.gradient_clip_val=null",
    )
    module = VLMModule(cfg)
    _, built = trainer_arguments(cfg, module)
    strategy = built["strategy"]
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes
    assert checkpointed == block_classes(module)
    assert strategy._state_dict_type == "sharded" and strategy.sharding_strategy.name == "SHARD_GRAD_OP"
    assert built["callbacks"] == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["trainer.fsdp.sharding_strategy=EVERYWHERE"],
            r"sharding_strategy='EVERYWHERE'; choose one of FULL_SHARD",
        ),
        (["trainer.fsdp.state_dict_type=local"], r"state_dict_type='local'; choose one of full, sharded"),
        (
            [
                "llm=smollm2_135m",
                "llm.activation_checkpointing=true",
                "trainer.fsdp.activation_checkpointing=true",
            ],
            r"and llm.activation_checkpointing=true would recompute the same blocks twice",
        ),
        (["llm=smollm2_135m", "llm.dtype=bfloat16"], r"cannot wrap the root unit .* mix dtypes .*llm\.dtype"),
    ],
)
def test_fsdp_configuration_errors_name_the_setting(make_cfg, overrides, message):
    cfg = make_cfg("trainer=fsdp", *overrides)
    with pytest.raises(ValueError, match=message):
        trainer_arguments(cfg, VLMModule(cfg))


def test_fsdp_gradient_clipping_goes_through_the_sharded_model():
    calls = []

    class Root:
        def clip_grad_norm_(self, max_norm):
            calls.append(max_norm)

    trainer = type("T", (), {"strategy": type("S", (), {"model": Root()})()})()
    FSDPGradientClipping(0.5).on_before_optimizer_step(trainer, None, None)
    assert calls == [0.5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP runs on CUDA GPUs (NCCL); none here")
def test_fsdp_trains_a_frozen_encoder_and_llm_on_gpus(tmp_path, data_dir):
    run = tmp_path / "fsdp"
    proc = run_cli(
        "train.py",
        "trainer=fsdp",
        f"trainer.devices={min(torch.cuda.device_count(), 2)}",
        "stage=align",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        *CLI,
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert ckpt["hyper_parameters"]["cfg"]["trainer"]["precision"] == "bf16-mixed"
    assert any(k.startswith("model.projector.") for k in ckpt["state_dict"])  # a full state dict


# -- preemption --------------------------------------------------------------------------------------
def test_sigterm_stops_every_rank_at_one_step_with_a_checkpoint_and_resume_continues(
    tmp_path, data_dir, make_cfg
):
    """SIGTERM reaches rank 0 only; both ranks stop after the same step, which last.ckpt holds; the run
    exits 128 + 15; `ckpt_path=last` in the same run directory trains the remaining steps."""
    run, marks, steps = tmp_path / "run", tmp_path / "marks", 12
    log_file = tmp_path / "train.log"
    command = [
        sys.executable,
        "train.py",
        *DDP_ON_CPU,
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        *CLI,
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run}",
        "+callbacks.marker._target_=tests.helpers.StepMarker",
        f"+callbacks.marker.out_dir={marks}",
        "+callbacks.marker.at_step=2",
        "+callbacks.marker.delay_s=1",  # the later steps are slow, so the signal lands mid-run
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    with log_file.open("w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (marks / "marker").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        finally:
            proc.kill()
    output = log_file.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    stopped = []
    for rank in range(2):
        path = marks / f"stopped_rank{rank}.json"
        for _ in range(100):  # rank 1 may finish a moment after rank 0
            if path.exists():
                break
            time.sleep(0.1)
        stopped.append(json.loads(path.read_text())["global_step"])
    preempted = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert stopped[0] == stopped[1] == preempted["global_step"], (stopped, output[-3000:])
    assert 2 <= preempted["global_step"] < steps
    assert f"SIGTERM: saved {run / 'checkpoints' / 'last.ckpt'} at step {stopped[0]} (rank 0)" in output

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    keys = tmp_path / "keys"
    train(
        make_cfg(
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            *QUICK,
            "ckpt_path=last",  # make_cfg's run dir is the preempted run's
            "+callbacks.keys._target_=tests.helpers.KeyRecorder",
            f"+callbacks.keys.out_dir={keys}",
        )
    )
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == steps and resumed["lr_schedulers"][0]["last_epoch"] == steps
    trained = json.loads((keys / "keys_rank0.json").read_text())
    assert len(trained) == (steps - preempted["global_step"]) * 8  # batches of 8: only the missing steps
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # put back after fit


def test_unknown_signal_is_named():
    assert parse_signals(["SIGTERM", "USR2"]) == [signal.SIGTERM, signal.SIGUSR2]
    with pytest.raises(ValueError, match=r"callbacks.preemption.signals: unknown signal 'SIGNOPE'"):
        Preemption(path="x.ckpt", signals=["SIGNOPE"])


# -- SLURM -------------------------------------------------------------------------------------------
def test_slurm_launcher_sizes_the_job_from_the_trainer_and_signals_what_preemption_catches():
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    launcher = {
        key: OmegaConf.select(cfg, f"hydra.launcher.{key}")
        for key in (
            "_target_",
            "nodes",
            "tasks_per_node",
            "gpus_per_node",
            "partition",
            "timeout_min",
            "signal_delay_s",
            "max_num_timeout",
        )
    }
    assert launcher == {
        "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
        "nodes": 2,
        "tasks_per_node": 8,  # one task per device: Lightning takes the ranks from SLURM
        "gpus_per_node": 8,
        "partition": None,
        "timeout_min": 1440,
        "signal_delay_s": 120,
        "max_num_timeout": 20,
    }
    assert OmegaConf.select(cfg, "hydra.launcher.additional_parameters.requeue") is True
    # the signal submitit asks SLURM to send before the time limit is one the preemption callback handles
    slurm_signal = signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]
    assert slurm_signal in parse_signals(list(cfg.callbacks.preemption.signals))
