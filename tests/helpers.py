"""Test-only callbacks, importable by `python train.py` subprocesses run from the repo root."""

import json
from pathlib import Path

import lightning as L


class KeyRecorder(L.Callback):
    """Writes the sample keys each rank trained on to `<out_dir>/keys_rank<r>.json`."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.keys = Path(out_dir), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys += batch["keys"]

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"keys_rank{trainer.global_rank}.json").write_text(json.dumps(self.keys))
