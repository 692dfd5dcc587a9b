"""Training callbacks."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from vlm.text_accounting import TextAccounting
from vlm.training.flops import PartFlopCounter, StepFlopCache, batch_shape, model_parts, peak_flops


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak memory in GB (10^9 bytes): CUDA's max allocated, or the max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss * (1 if sys.platform == "darwin" else 1024) / 1e9  # bytes on macOS, KiB on Linux


class Throughput(L.Callback):
    """Speed, sizes and model FLOPs utilisation, logged under perf/ every `window` timed training batches.

    Over the window's wall time (validation left out), multiplied by the world size (ranks taken to run
    alike): tokens_per_s (non-padding tokens, vision tokens included), images_per_s, samples_per_s,
    tflops_per_s, and flops_per_step (model FLOPs of one batch's forward and backward, window mean, all
    ranks' batches together). Per device: mfu (FLOP/s achieved / peak FLOP/s of one device) and
    peak_memory_gb (this process's peak so far). This rank's window: vision_tokens_per_sample,
    padding_share (the batches' positions that hold no token: what `data.packing` saves), and over
    the samples with images, the text their images stand for (each sample's first answer) per vision
    token: chars_per_vision_token and compression_<tokenizer> for the LLM's tokenizer and each of
    `tokenizers` (reference tokenizer specs, `vlm.text_accounting`), as benchmark=synthetic counts them.
    Once, after the first counted batch: flops_share_<part>.

    FLOPs are counted by torch on the ops that run (`vlm.training.flops`), once per batch shape. A counted
    batch runs slower, so it is left out of the timing. The peak is the datasheet's for known GPUs and a
    timed matmul on CPU; `peak_flops` (FLOP/s of one device) overrides it. CUDA is synchronised only where
    the clock is read: at window ends, around validation and around counted batches; the texts are counted
    on the CPU.
    """

    def __init__(
        self,
        window: int = 10,
        peak_flops: float | None = None,
        tokenizers: Sequence[str] = (),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if window < 1:
            raise ValueError(f"callbacks.throughput.window must be >= 1, got {window}")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(
                f"callbacks.throughput.peak_flops must be > 0 (FLOP/s of one device), got {peak_flops}"
            )
        self.window, self.peak_flops, self.clock = window, peak_flops, clock
        self.tokenizers = list(tokenizers)
        self.accounting: TextAccounting | None = None
        self.flops = StepFlopCache()
        self._peak: float | None = None
        self._counter: PartFlopCounter | None = None
        self._shape: tuple | None = None
        self._step_flops = 0
        self._split_logged = False
        self._start: float | None = None  # clock reading when the running stretch began; None: paused
        self._reset_window()

    def _reset_window(self) -> None:
        self._elapsed = 0.0
        self._steps = self._samples = self._images = self._window_flops = 0
        self._counts: torch.Tensor | None = None  # tokens, vision tokens, text counts (with images)

    def _now(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return self.clock()

    def _pause(self, device: torch.device) -> None:
        if self._start is not None:
            self._elapsed += self._now(device) - self._start
            self._start = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.accounting = TextAccounting(pl_module.model.tokenizer, self.tokenizers)
        self._peak, source = (
            (self.peak_flops, "callbacks.throughput.peak_flops")
            if self.peak_flops
            else peak_flops(pl_module.device, trainer.precision)
        )
        if self._peak is None:
            rank_zero_warn(
                f"perf/mfu is not logged: no peak FLOP/s for {source}; "
                "set callbacks.throughput.peak_flops=<FLOP/s of one device>"
            )
        else:
            rank_zero_info(f"MFU against a peak of {self._peak / 1e12:.4g} TFLOP/s per device ({source})")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._shape = batch_shape(batch)
        flops = self.flops.get(*self._shape)
        if flops is None:
            self._pause(pl_module.device)
            self._counter = PartFlopCounter(model_parts(pl_module)).__enter__()
            return
        self._step_flops = sum(flops.values())
        if self._start is None:
            self._start = self._now(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._counter is not None:
            self._finish_count(trainer)
            return
        input_ids = batch["input_ids"]
        texts = [answers[0] if answers else "" for answers in batch["answers"]]
        text_counts = torch.tensor([list(self.accounting.count(text).values()) for text in texts])
        has_images = (batch["images_per_sample"] > 0)[:, None]
        # device tensors summed without reading them back, and the texts' counts copied to the device
        # without waiting, so no step waits for the GPU
        counts = torch.cat(
            [
                torch.stack(
                    [
                        batch["attention_mask"].sum(),
                        (input_ids == pl_module.model.tokenizer.image_token_id).sum(),
                        torch.tensor(input_ids.numel(), device=input_ids.device),
                    ]
                ),
                (text_counts.to(input_ids.device, non_blocking=True) * has_images).sum(0),
            ]
        )
        self._counts = counts if self._counts is None else self._counts + counts
        self._steps += 1
        self._samples += len(batch["answers"])  # samples, not rows: a packed row holds several
        self._images += batch["pixel_values"].shape[0]
        self._window_flops += self._step_flops
        if self._steps == self.window:
            self._log_window(trainer, pl_module)

    def _finish_count(self, trainer) -> None:
        counter, self._counter = self._counter, None
        counter.__exit__(None, None, None)
        self.flops.add(*self._shape, dict(counter.flops))
        if self._split_logged or not counter.total:
            return
        self._split_logged = True
        shares = {f"perf/flops_share_{part}": flops / counter.total for part, flops in counter.flops.items()}
        for logger in trainer.loggers:
            logger.log_metrics(shares, step=trainer.global_step)
        rank_zero_info(
            "model FLOPs of one training batch (forward + backward): "
            + ", ".join(
                f"{part} {flops / 1e9:.4g} G ({flops / counter.total:.1%})"
                for part, flops in counter.flops.items()
            )
        )

    def _log_window(self, trainer, pl_module) -> None:
        device = pl_module.device
        now = self._now(device)
        elapsed = self._elapsed + now - self._start
        self._start = now  # the next window starts here, so the time between windows counts too
        tokens, vision_tokens, positions, *text_counts = self._counts.tolist()
        world = trainer.world_size
        metrics = {
            "perf/tokens_per_s": tokens * world / elapsed,
            "perf/images_per_s": self._images * world / elapsed,
            "perf/samples_per_s": self._samples * world / elapsed,
            "perf/vision_tokens_per_sample": vision_tokens / self._samples,
            "perf/padding_share": 1 - tokens / positions,  # the batches' positions that are padding
            "perf/peak_memory_gb": peak_memory_gb(device),
            "perf/flops_per_step": self._window_flops * world / self._steps,
            "perf/tflops_per_s": self._window_flops * world / elapsed / 1e12,
        }
        if vision_tokens:
            text = dict(zip(self.accounting.count_keys, text_counts, strict=True))
            metrics |= {f"perf/{k}": v for k, v in self.accounting.ratios(text, vision_tokens).items()}
        if self._peak:
            metrics["perf/mfu"] = self._window_flops / elapsed / self._peak
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._reset_window()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._pause(pl_module.device)

    def _stop_counting(self) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop_counting()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop_counting()


class NonFiniteLoss(L.Callback):
    """Stops training with an error naming the step when the training loss is NaN or infinite, before the
    optimizer step it would spoil, so no checkpoint holds the damage. Up to `patience` such steps in a row
    are skipped instead (no parameter changes); the ranks decide together. Costs one read of a flag from
    the device per optimizer step."""

    def __init__(self, patience: int = 0) -> None:
        if patience < 0:
            raise ValueError(f"callbacks.non_finite_loss.patience must be >= 0, got {patience}")
        self.patience = patience
        self.in_a_row = 0
        self._finite: torch.Tensor | None = None  # every loss since the last optimizer step was finite

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._finite = finite if self._finite is None else self._finite & finite

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        finite = self._finite is None or bool(self._finite)
        self._finite = None
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.in_a_row > self.patience:
            raise FloatingPointError(
                f"non-finite training loss at step {trainer.global_step} ({self.in_a_row} step(s) in a row, "
                f"callbacks.non_finite_loss.patience={self.patience}): stopped before the optimizer step; "
                f"the checkpoints hold the last finite state (lower optim.lr, or resume with ckpt_path=last)"
            )
        rank_zero_warn(f"non-finite training loss at step {trainer.global_step}: step skipped")
        optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients alone
