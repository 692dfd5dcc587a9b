"""Test-only callbacks, importable by `python train.py` subprocesses run from the repo root; a reader for
offline W&B runs."""

import importlib.util
import json
import os
import shutil
import struct
import time
from pathlib import Path

import lightning as L

# why each OCR engine's tests skip (None: installed)
OCR_ENGINES_MISSING = {
    "tesseract": None
    if shutil.which("tesseract")
    else "tesseract is not installed (apt-get install tesseract-ocr)",
    "rapidocr": None
    if importlib.util.find_spec("rapidocr_onnxruntime")
    else "rapidocr_onnxruntime is not installed (make ocr)",
}


class KeyRecorder(L.Callback):
    """Writes the sample keys each rank trained on to `<out_dir>/keys_rank<r>.json`."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.keys = Path(out_dir), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys += batch["keys"]

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"keys_rank{trainer.global_rank}.json").write_text(json.dumps(self.keys))


class ProcessRecorder(L.Callback):
    """Writes, per process and job, its rank, seed, Hydra mode and output dir to `<out_dir>/*.json`."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_start(self, trainer, pl_module) -> None:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        record = {
            "pid": os.getpid(),
            "rank": trainer.global_rank,
            "seed": pl_module.cfg.seed,
            "mode": hydra_cfg.mode.name,
            "output_dir": hydra_cfg.runtime.output_dir,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}-seed{pl_module.cfg.seed}-pid{os.getpid()}.json"
        path.write_text(json.dumps(record))


class RaiseAtStep(L.Callback):
    """Fails the run after `step` optimizer steps (a crash in the middle of fit)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"RaiseAtStep: forced failure at step {trainer.global_step}")


def finished_wandb_records(run_dir: Path, timeout: float = 60.0) -> list:
    """`wandb_records` of a finished run, complete: W&B's service writes the file's last records (the
    exit record among them) after `finish()` has returned, so wait for the exit record."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_records(run_dir: Path) -> list:
    """The records (wandb_internal_pb2.Record) of an offline W&B run's `run-*.wandb` file: LevelDB's log
    format (32 KiB blocks of chunks, each with a 7-byte header) after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data = next(Path(run_dir).glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B", f"{run_dir}: not a W&B transaction log"
    block, header = 32768, 7
    records, chunk, pos = [], b"", header
    while pos + header <= len(data):
        if block - pos % block < header:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if kind == 0:  # zero padding at the end of the file
            break
        chunk += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


class StepMarker(L.Callback):
    """Lets a test signal a run mid-training: writes `<out_dir>/marker` once `at_step` optimizer steps have
    run and from then on sleeps `delay_s` after each step; each rank writes the step it stopped at to
    `<out_dir>/stopped_rank<r>.json` (after an exception too)."""

    def __init__(self, out_dir: str, at_step: int, delay_s: float) -> None:
        self.out_dir, self.at_step, self.delay_s = Path(out_dir), at_step, delay_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.at_step:
            marker = self.out_dir / "marker"
            if trainer.is_global_zero and not marker.exists():
                self.out_dir.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(trainer.global_step))
            import time

            time.sleep(self.delay_s)

    def _stopped(self, trainer) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"stopped_rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"global_step": trainer.global_step}))

    def on_train_end(self, trainer, pl_module) -> None:
        self._stopped(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stopped(trainer)
