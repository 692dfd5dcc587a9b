"""Preemption: a signal makes every rank save a checkpoint at the next optimizer step, then stop.

A cluster that takes the machines back first sends a signal: Kubernetes and torchrun SIGTERM, SLURM under
`hydra/launcher=slurm` submitit's SIGUSR2 (`signal_delay_s` before the time limit) or SIGTERM on
preemption. The handler only notes the signal; after each optimizer step the ranks agree on it (one
all-reduce of a number on the CPU, through a gloo group: the GPUs are never waited for), so they all
stop at the same step even when one rank was signalled. Then
`trainer.save_checkpoint` writes `path` (the strategy decides who writes: DDP rank 0, FSDP as configured;
the file is replaced atomically, vlm.training.checkpointing),
the handler that was installed before the trainer runs (submitit's: it requeues the job), and rank 0 exits
with 128 + the signal's number, as a process killed by that signal would. `ckpt_path=<path>` (or
`ckpt_path=last`, the run's newest `last*.ckpt`) continues from that step.

Lightning has its own SIGTERM handling (stop at the end of the step, without a checkpoint, and a collective
inside the signal handler) and SLURM requeue (a checkpoint written inside the signal handler, mid-step);
the callback replaces both for the length of the training loop and restores them afterwards.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import lightning as L
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Training stopped on a signal after writing its checkpoint. Rank 0 exits with 128 + the signal's
    number, as if killed by it; the other ranks with 0, since Lightning's own launcher kills rank 0 as soon
    as one of the ranks it started ends with an error, which would cut rank 0's exit short."""

    def __init__(self, signum: int, rank: int) -> None:
        super().__init__(128 + signum if rank == 0 else 0)
        self.signum = signum


UNCATCHABLE = (signal.SIGKILL, signal.SIGSTOP)  # the kernel acts on these without telling the process


def _signal_name(name: str) -> str:
    return name if name.startswith("SIG") else f"SIG{name}"


def signal_problem(names: Sequence[str]) -> str | None:
    """What makes `names` unusable as signals to catch (an unknown or an uncatchable one), or None."""
    catchable = sorted(
        s.name for s in signal.valid_signals() if isinstance(s, signal.Signals) and s not in UNCATCHABLE
    )
    for name in names:
        key = _signal_name(str(name))
        if key not in signal.Signals.__members__:
            return f"unknown signal {name!r}; catchable: {catchable}"
        if signal.Signals[key] in UNCATCHABLE:
            return f"{key} cannot be caught (the process ends or stops at once); catchable: {catchable}"
    return None


def parse_signals(names: Sequence[str]) -> list[signal.Signals]:
    """`["SIGTERM", "SIGUSR1"]` -> signal numbers; an unknown or uncatchable name is an error that lists
    the catchable ones."""
    problem = signal_problem(names)
    if problem:
        raise ValueError(f"callbacks.preemption.signals: {problem}")
    return [signal.Signals[_signal_name(name)] for name in names]


class Preemption(L.Callback):
    """On one of `signals`: `path` written at the next optimizer step on every rank, then `Preempted`."""

    def __init__(self, path: str, signals: Sequence[str] = ("SIGTERM", "SIGUSR1", "SIGUSR2")) -> None:
        self.path = str(path)
        self.signals = parse_signals(list(signals))
        self.received = 0  # the number of the first signal received here, 0 = none
        self._before_trainer: dict[int, object] = {}  # handlers from before Lightning set its own
        self._replaced: dict[int, object] = {}  # handlers active when ours went in, put back at the end
        self._last_step = -1
        self._group = None  # the process group the flag is reduced in (None: the default one)

    # -- handlers -------------------------------------------------------------------------------
    def _note(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:
            self.received = signum
            log.warning("received %s: checkpoint at the next optimizer step", signal.Signals(signum).name)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._before_trainer = {s: signal.getsignal(s) for s in self.signals}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received, self._last_step = 0, trainer.global_step
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # a CPU tensor needs a gloo group; under NCCL a CUDA flag would sync the host with the GPU
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: preemption signals are not handled")
            return
        for signum in self.signals:
            self._replaced[signum] = signal.getsignal(signum)
            signal.signal(signum, self._note)

    def _restore(self) -> None:
        for signum, handler in self._replaced.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._replaced = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_signalled(trainer)  # a signal during the last validation
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    # -- the step boundary ----------------------------------------------------------------------
    def _agreed_signal(self, trainer: L.Trainer) -> int:
        """The largest signal number any rank received (0 = none); the same on every rank."""
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return self.received
        received = torch.tensor([self.received])
        dist.all_reduce(received, op=dist.ReduceOp.MAX, group=self._group)
        return int(received.item())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if trainer.global_step != self._last_step:  # else accumulating gradients: not a step boundary
            self._last_step = trainer.global_step
            self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        signum = self._agreed_signal(trainer)
        if not signum:
            return
        for callback in trainer.checkpoint_callbacks:
            # a ModelCheckpoint writing the same last.ckpt must take it as its own: else a run resumed in
            # this directory before any validation writes last-v1.ckpt beside it (Lightning's version counter)
            last = getattr(callback, "save_last", False) and callback.format_checkpoint_name({}, "last")
            if last and os.path.normpath(last) == os.path.normpath(self.path):
                callback.last_model_path = last
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(self.path, weights_only=False)  # all state; every rank: the strategy writes
        log.warning(
            "%s: saved %s at step %d (rank %d); resume with ckpt_path=%s (or ckpt_path=last in this run dir)",
            signal.Signals(signum).name,
            self.path,
            trainer.global_step,
            trainer.global_rank,
            self.path,
        )
        if self.received:  # signalled here: the scheduler's own handler (submitit: requeue) runs now
            previous = self._before_trainer.get(self.received)
            if callable(previous):
                previous(self.received, None)
        raise Preempted(signum, trainer.global_rank)
