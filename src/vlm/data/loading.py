"""Batches and loaders of the streams: the collator that counts samples per source, the loader that
tallies what it delivered, and the end-of-run data report."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence

from torch.utils.data import DataLoader

from vlm.contracts import Batch
from vlm.data.processing import (
    Collator,
    SkipCounter,
)
from vlm.data.stream import ShardStream

log = logging.getLogger(__name__)


# -- batches, loaders and the end-of-run report -------------------------------------------------------
class SourceCollator:
    """A collator (`Collator`, or `PackingCollator` for packed training rows) whose batches also count
    their samples per source (every source named, zeros included, so every rank logs the same keys)."""

    def __init__(self, collator: Collator, names: Sequence[str]) -> None:
        self.collator = collator
        self.names = list(names)

    def __call__(self, samples: list[dict]) -> Batch:
        batch = self.collator(samples)
        counts = dict.fromkeys(self.names, 0)
        for sample in samples:
            name = sample.get("source", "data")
            counts[name] = counts.get(name, 0) + 1
        batch["sources"] = counts
        return batch


class DataReport:
    """What the loaders delivered, per split: batches, samples per source, skipped samples by reason.

    Counts are of batches loaded, which for training includes the one batch Lightning fetches ahead
    when `max_steps` ends the run; bad data counts once per read (a bad sample read in two epochs
    counts twice; a repeat pass of evaluation does not count again).
    """

    def __init__(self) -> None:
        self.splits: dict[str, dict] = {}

    def _entry(self, split: str) -> dict:
        return self.splits.setdefault(
            split, {"batches": 0, "samples": 0, "sources": Counter(), "skipped": Counter()}
        )

    def add(self, split: str, batch: Batch) -> None:
        entry = self._entry(split)
        entry["batches"] += 1
        entry["samples"] += len(batch["keys"])
        entry["sources"].update(batch.get("sources", {}))
        entry["skipped"].update(batch.get("skipped", {}))

    def add_skipped(self, split: str, counts: dict[str, int]) -> None:
        if counts:
            self._entry(split)["skipped"].update(counts)

    def summary(self) -> dict:
        """`{split: {batches, samples, sources, skipped}, "skipped": totals by reason}` (this process)."""
        out: dict = {
            split: {
                "batches": e["batches"],
                "samples": e["samples"],
                "sources": {k: v for k, v in e["sources"].items() if v},
                "skipped": dict(e["skipped"]),
            }
            for split, e in self.splits.items()
        }
        totals: Counter = Counter()
        for e in self.splits.values():
            totals.update(e["skipped"])
        out["skipped"] = dict(totals)
        return out

    def format(self) -> str:
        summary = self.summary()
        parts = []
        for split, e in summary.items():
            if split == "skipped":
                continue
            sources = ", ".join(f"{k} {v}" for k, v in sorted(e["sources"].items()))
            parts.append(f"{split}: loaded {e['samples']} samples in {e['batches']} batches ({sources})")
        totals = summary["skipped"]
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(totals.items())) if totals else "none"
        return "; ".join(parts) + f"; skipped (bad data, by reason): {skipped}"


class StreamLoader(DataLoader):
    """DataLoader that sets the stream's epoch before each pass and tallies batches into a report."""

    def __init__(self, dataset: ShardStream, split: str, report: DataReport, epoch_of=None, **kwargs):
        super().__init__(dataset, **kwargs)
        self.split, self.report, self.epoch_of = split, report, epoch_of
        self._passes = 0

    def __iter__(self):
        if self.dataset.train:
            self.dataset.epoch = self.epoch_of() if self.epoch_of is not None else self._passes
        self._passes += 1
        return self._tally(super().__iter__())

    def _tally(self, batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            self.report.add(self.split, batch)
            yield batch
        if self.num_workers == 0:  # anything counted after the last batch, in this process
            self.report.add_skipped(self.split, SkipCounter.drain())
