"""Training callbacks."""

from __future__ import annotations

import time

import lightning as L


class Throughput(L.Callback):
    """Logs perf/tokens_per_s (non-padding tokens, vision tokens included) and perf/images_per_s."""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._start: float | None = None
        self._tokens = self._images = self._steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += int(batch["attention_mask"].sum())
        self._images += int(batch["pixel_values"].shape[0])
        self._steps += 1
        if self._steps == self.window:
            elapsed = time.perf_counter() - self._start
            pl_module.log("perf/tokens_per_s", self._tokens / elapsed)
            pl_module.log("perf/images_per_s", self._images / elapsed)
            self._start, self._tokens, self._images, self._steps = None, 0, 0, 0
