"""A LightningDataModule that streams webdataset shards on one CPU or many GPUs.

Training streams forever: each cycle reshuffles the shard list with a seed that depends on the cycle
and on the step the run (re)started from, and every (rank, worker) reads its own disjoint slice of
shards, so ranks see disjoint samples and never run dry. Training length is `trainer.max_steps`.
Validation and test read every shard once; rank r keeps samples r, r + world, ..., capped so every
rank gets the same number.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import lightning as L
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm.data.processing import BadSample, Collator, SampleProcessor, SkipCounter
from vlm.data.shards import expand_urls


def _count_and_continue(error: Exception) -> bool:
    """webdataset handler: a broken tar member is counted as a skipped sample and reading goes on."""
    SkipCounter.add(
        BadSample(getattr(error, "key", "?"), "unreadable_tar", f"{type(error).__name__}: {error}")
    )
    return True


class ShardStream(IterableDataset):
    """Processed samples from shards, split by rank and dataloader worker."""

    def __init__(
        self,
        urls: list[str],
        processor: Callable[[dict], dict],
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        samples_per_rank: int | None = None,
    ) -> None:
        self.urls, self.processor, self.train = urls, processor, train
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.samples_per_rank = shuffle_buffer, samples_per_rank

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def train_shards(self) -> Iterator[dict]:
        """An endless stream of this (rank, worker)'s shards, reshuffled every cycle."""
        worker, num_workers = self._worker()
        readers = self.world_size * num_workers
        if len(self.urls) < readers:
            raise ValueError(
                f"{len(self.urls)} training shard(s) for {self.world_size} rank(s) x {num_workers} "
                f"worker(s): need at least one shard per reader; write smaller shards or use "
                f"fewer workers"
            )
        slot = self.rank * num_workers + worker
        cycle = 0
        while True:
            order = list(self.urls)
            random.Random(f"{self.seed}-{cycle}").shuffle(order)
            for url in order[slot::readers]:
                yield {"url": url}
            cycle += 1

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = self._worker()
        if self.train:
            samples = wds.tarfile_to_samples(handler=_count_and_continue)(self.train_shards())
            rng = random.Random(f"{self.seed}-{self.rank}-{worker}")
            samples = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)
        else:
            samples = self._evaluation_samples(worker, num_workers)
        for raw in samples:
            try:
                yield self.processor(raw)
            except BadSample as error:
                SkipCounter.add(error)

    def _evaluation_samples(self, worker: int, num_workers: int) -> Iterator[dict]:
        shards = ({"url": url} for url in self.urls)
        kept = 0
        for index, raw in enumerate(wds.tarfile_to_samples(handler=_count_and_continue)(shards)):
            if index % self.world_size != self.rank:
                continue
            if self.samples_per_rank is not None and kept >= self.samples_per_rank:
                return
            if kept % num_workers == worker:
                yield raw
            kept += 1


class ShardDataModule(L.LightningDataModule):
    """Streams train/val/test shards; `source.prepare()` (if given) writes them first and names them."""

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
    ) -> None:
        super().__init__()
        self.processor_factory, self.collate = processor_factory, Collator(pad_id)
        self.source = source
        self.urls = {"train": train_urls, "val": val_urls, "test": test_urls}
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.val_samples, self.val_split, self.seed = val_samples, val_split, seed

    def prepare_data(self) -> None:
        if self.source is not None:
            self.source.prepare()

    def shards(self, split: str) -> list[str]:
        urls = self.urls[split]
        if urls is None and self.source is not None:
            urls = self.source.prepare()[split]
        if urls is None:
            raise ValueError(f"no shards configured for the {split} split (data.{split}_urls)")
        return expand_urls(urls)

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset: IterableDataset, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=False,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        start_step = self.trainer.global_step if self.trainer is not None else 0
        stream = ShardStream(
            self.shards("train"),
            self.processor_factory(True),
            train=True,
            rank=rank,
            world_size=world,
            seed=hash((self.seed, start_step)) % 2**31,
            shuffle_buffer=self.shuffle_buffer,
        )
        return self._loader(stream, self.batch_size)

    def eval_dataloader(self, split: str, limit: int | None = None) -> DataLoader:
        rank, world = self._rank()
        per_rank = None
        if self.source is not None:
            per_rank = self.source.sample_counts()[split] // world
        if limit is not None:
            per_rank = min(per_rank or limit, limit // world)
        stream = ShardStream(
            self.shards(split),
            self.processor_factory(False),
            train=False,
            rank=rank,
            world_size=world,
            samples_per_rank=per_rank,
        )
        return self._loader(stream, self.eval_batch_size)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.val_split, self.val_samples)

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")
