"""A LightningDataModule that streams webdataset shards on one CPU or many GPUs, built of small stages:
`tar_reading` (shards -> raw samples, bounded), `stream` (per rank and worker: shard order, shuffling,
mixing, processing), `loading` (batches, the data report).

Bad data (corrupt or missing images, malformed records, truncated or unreadable tars, empty text,
members or images over `ReadLimits`, tar members of no sample) is skipped, counted by reason
(`SkipCounter`) and reported per batch (`skipped`), in `summary()` and in a log line at the end of
fitting; one bad item never stops or stalls a run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import lightning as L
from torch.utils.data import DataLoader

from vlm.data.images import MAX_IMAGE_PIXELS
from vlm.data.loading import DataReport, SourceCollator, StreamLoader
from vlm.data.processing import (
    Collator,
    PackingCollator,
    SampleProcessor,
)
from vlm.data.shards import expand_urls
from vlm.data.stream import EvalStream, ShardStream, Source, TrainStream, stable_seed
from vlm.data.tar_reading import MAX_MEMBER_BYTES, ReadLimits, count_samples, index_count, is_local

log = logging.getLogger(__name__)


# -- the datamodule ---------------------------------------------------------------------------------
class ShardDataModule(L.LightningDataModule):
    """Streams train/val/test shards of one source or a weighted mixture (`sources`).

    `source.prepare()` (if given, e.g. the built-in synthetic data) writes the shards first and names
    them; otherwise `train_urls`/`val_urls`/`test_urls` name them (paths, globs, brace patterns, any
    URL webdataset opens). With `sources` (a list of {name, train_urls, weight, val_urls, test_urls})
    training mixes them by weight; validation/test read `val_urls`/`test_urls`, or else the first
    source's. `max_member_bytes` and `max_image_pixels` bound what one tar member may cost
    (`ReadLimits`). `packing`: training batches packed into rows of the processor's `max_length`
    (`PackingCollator`; the LLM must take `segment_ids`).
    """

    def __init__(
        self,
        processor_factory: Callable[[bool], SampleProcessor],
        pad_id: int,
        source=None,
        train_urls=None,
        val_urls=None,
        test_urls=None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        val_samples: int | None = None,
        val_split: str = "val",
        seed: int = 0,
        name: str | None = None,
        sources=None,
        batches_per_epoch: int | None = None,
        max_member_bytes: int = MAX_MEMBER_BYTES,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        packing: bool = False,
    ) -> None:
        super().__init__()
        self.processor_factory, self.pad_id = processor_factory, pad_id
        self.packing = packing
        self.source = source
        self.urls = {"train": train_urls, "val": val_urls, "test": test_urls}
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.val_samples, self.val_split, self.seed = val_samples, val_split, seed
        self.name = name or "data"
        self.mixture = [dict(entry) for entry in sources] if sources else None
        if self.mixture is not None and train_urls is not None:
            raise ValueError("give either data.sources (a mixture) or data.train_urls, not both")
        self.batches_per_epoch = batches_per_epoch
        self.limits = ReadLimits(max_member_bytes, max_image_pixels)
        self.report = DataReport()
        self._counts: dict[tuple[str, ...], int] = {}

    # -- shards -----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.source is not None:
            self.source.prepare()

    @staticmethod
    def _expand(urls, what: str) -> list[str]:
        try:
            return expand_urls(urls)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"{what}: {error}; write them with `python -m vlm.app.prepare <dataset>` (see "
                f"conf/data/*.yaml) or point the data.*_urls at existing shards"
            ) from error

    def train_sources(self) -> list[Source]:
        """What training streams: the mixture's sources, or one source named `name`."""
        if self.mixture is not None:
            return [
                Source(
                    str(entry["name"]),
                    self._expand(entry["train_urls"], f"data source {entry['name']!r} (train)"),
                    float(entry.get("weight", 1.0)),
                )
                for entry in self.mixture
            ]
        return [Source(self.name, self.shards("train"))]

    def _split_urls(self, split: str) -> tuple[str, object]:
        """(source name, URLs as configured) for an evaluation split."""
        if self.urls.get(split) is not None:
            return self.name, self.urls[split]
        if self.mixture is not None:
            for entry in self.mixture:
                urls = entry.get(f"{split}_urls")
                if urls is not None:
                    return str(entry["name"]), urls
        if self.source is not None:
            return self.name, self.source.prepare()[split]
        raise ValueError(f"no shards configured for the {split} split (data.{split}_urls)")

    def shards(self, split: str) -> list[str]:
        """Shard URLs of a split (for a mixture: the explicit `<split>_urls` or the first source's)."""
        name, urls = self._split_urls(split)
        return self._expand(urls, f"data {name!r} ({split})")

    def sample_count(self, split: str, urls: Sequence[str] | None = None, count: bool = True) -> int | None:
        """Samples in a split's shards: from the source, else an index.json next to the shards, else
        (with `count`) counted from the tar headers once."""
        urls = list(urls) if urls is not None else self.shards(split)
        key = (split, *urls)
        if key in self._counts:
            return self._counts[key]
        found = None
        if self.source is not None and urls == self.shards(split):
            found = self.source.sample_counts().get(split)
        if found is None:
            found = index_count(urls, split)
        if found is None and count:
            found = count_samples(urls)
            log.info("counted %d samples in %d %s shard(s) (no index.json)", found, len(urls), split)
        if found is not None:
            self._counts[key] = found
        return found

    def epoch_batches(self, world: int) -> int | None:
        """Batches per rank and epoch: `batches_per_epoch`, else the train sample count (all sources
        together, from the source or index.json) // (world x batch size), at least 1; None = endless."""
        if self.batches_per_epoch is not None:
            if self.batches_per_epoch < 1:
                raise ValueError(f"data.batches_per_epoch={self.batches_per_epoch} must be >= 1 (or null)")
            return int(self.batches_per_epoch)
        total = 0
        for source in self.train_sources():
            split_count = (
                self.source.sample_counts().get("train")
                if self.source is not None and self.mixture is None
                else index_count(source.urls, "train")
            )
            if split_count is None:
                return None
            total += split_count
        return max(1, total // (world * self.batch_size))

    # -- loaders ----------------------------------------------------------------------------------
    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset: ShardStream, split: str, batch_size: int, names: Sequence[str]) -> DataLoader:
        trainer = self.trainer
        collator = (
            PackingCollator(self.pad_id, dataset.processor.max_length)
            if self.packing and split == "train"
            else Collator(self.pad_id)
        )
        return StreamLoader(
            dataset,
            split,
            self.report,
            epoch_of=(lambda: trainer.current_epoch) if trainer is not None else None,
            batch_size=batch_size,
            collate_fn=SourceCollator(collator, names),
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=False,
        )

    def stream_seed(self) -> int:
        """The training stream's seed: data.seed and the global step the run (re)started from."""
        start_step = self.trainer.global_step if self.trainer is not None else 0
        return stable_seed(self.seed, start_step)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        sources = self.train_sources()
        batches = self.epoch_batches(world)
        stream = TrainStream(
            sources,
            self.processor_factory(True),
            rank=rank,
            world_size=world,
            seed=self.stream_seed(),
            shuffle_buffer=self.shuffle_buffer,
            batch_size=self.batch_size,
            batches_per_epoch=batches,
            limits=self.limits,
        )
        stream.check_readers(max(1, self.num_workers))  # fail here, not inside a worker
        total = sum(s.weight for s in sources)
        log.info(
            "training streams %s; rank %d of %d, %d worker(s); epoch: %s",
            ", ".join(f"{s.name} ({len(s.urls)} shards, weight {s.weight / total:.3g})" for s in sources),
            rank,
            world,
            self.num_workers,
            f"{batches} batches of {self.batch_size} per rank" if batches else "endless (trainer.max_steps)",
        )
        return self._loader(stream, "train", self.batch_size, [s.name for s in sources])

    def eval_dataloader(self, split: str, limit: int | None = None) -> DataLoader:
        """Every rank gets the same number of samples: (the split's count, at most `limit`) // world.
        The count comes from the source or index.json; failing those, local shards are counted from
        their tar headers; remote ones too unless `limit` caps the split (then limit // world)."""
        rank, world = self._rank()
        name, _ = self._split_urls(split)
        urls = self.shards(split)
        count = self.sample_count(split, urls, count=limit is None or all(is_local(u) for u in urls))
        total = count if limit is None else limit if count is None else min(count, limit)
        stream = EvalStream(
            urls,
            self.processor_factory(False),
            rank=rank,
            world_size=world,
            samples_per_rank=total // world,
            name=name,
            limits=self.limits,
        )
        return self._loader(stream, split, self.eval_batch_size, [name])

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.val_split, self.val_samples)

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    # -- report -----------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Samples per split and source, and bad data skipped by reason, seen by this process."""
        return self.report.summary()

    def log_summary(self) -> None:
        rank, world = self._rank()
        where = f" (rank {rank} of {world})" if world > 1 else ""
        log.info("data summary%s: %s", where, self.report.format())

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self.log_summary()
