"""The sample streams: shards -> raw samples -> processed samples, per rank and worker.

Training. Every (rank, dataloader worker) is a *reader*. An epoch is a fixed number of batches per rank
(`batches_per_epoch`, or the index's sample count // (world size x batch size); without either the
epoch never ends and `trainer.max_steps` alone cuts the run). At the start of epoch e the shard list of
each source is shuffled with the seed `(stream seed, e, source)`, the same on every rank, and reader
`slot = rank * workers + worker` takes shards `slot, slot + readers, ...`; it reads only those during
the epoch (starting them over, reshuffled, if it runs out before its share of batches), so ranks never
see the same sample within an epoch. Samples go through a shuffle buffer and, with several sources,
are drawn by weight, both with the reader's seed `(stream seed, e, rank, worker)`. The stream seed is
`(data.seed, global step the run (re)started from)`, so a resumed run does not replay the same order.

Evaluation reads every shard once, in order; rank r keeps samples r, r + world, ..., and every rank
(and within it every worker) yields the same number of usable samples, so every rank runs the same
number of batches (a rank short of usable samples repeats its own from the start).
"""

from __future__ import annotations

import hashlib
import logging
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from torch.utils.data import IterableDataset, get_worker_info

from vlm.data.processing import (
    SkipCounter,
)
from vlm.data.skips import Skip
from vlm.data.tar_reading import ReadLimits, read_shards

log = logging.getLogger(__name__)

# our training streams report their exact length (whole batches per worker); Lightning's generic
# warning about IterableDataset lengths with several workers does not apply
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


# -- streams ----------------------------------------------------------------------------------------
def stable_seed(*parts) -> int:
    """A 63-bit seed from the parts, the same in every process (unlike `hash` of strings)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer of `size` items."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def hold_last(items: Iterable) -> Iterator:
    """The items, each handed out only once the next one is ready (the last at the end). Bad samples
    read after the last good one are then counted before it is batched, so their counts travel with
    the final batch instead of staying behind in a finished dataloader worker."""
    pending, has = None, False
    for item in items:
        if has:
            yield pending
        pending, has = item, True
    if has:
        yield pending


@dataclass
class Source:
    """One stream of a mixture: its name (logged), shard URLs and weight (relative, per sample)."""

    name: str
    urls: list[str]
    weight: float = 1.0


_PASS_END = object()


class ShardStream(IterableDataset):
    """Processed samples from shards, split by rank and dataloader worker (see the module docstring): what
    the training and the evaluation streams share. `urls` is a list of shard URLs (one source called
    `name`) or of `Source`s mixed by weight; `limits` bound what one tar member may cost (`ReadLimits`).
    A sample the processor refuses (`Skip`) is counted by reason and left out."""

    train: bool

    def __init__(
        self,
        urls: Sequence[str] | Sequence[Source],
        processor: Callable[[dict], dict],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        name: str = "data",
        limits: ReadLimits | None = None,
    ) -> None:
        urls = list(urls)
        self.sources = urls if urls and isinstance(urls[0], Source) else [Source(name, urls)]
        self.processor = processor
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.limits = limits or ReadLimits()
        if any(s.weight < 0 for s in self.sources) or sum(s.weight for s in self.sources) <= 0:
            raise ValueError(f"source weights must be >= 0 and not all 0: {self.weights()}")

    @property
    def urls(self) -> list[str]:
        return [url for source in self.sources for url in source.urls]

    def weights(self) -> dict[str, float]:
        return {s.name: s.weight for s in self.sources}

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def _process(self, raw: dict, name: str, quiet: bool = False) -> dict | None:
        try:
            sample = self.processor(raw)
        except Skip as error:
            if not quiet:
                SkipCounter.add(error)
            return None
        if isinstance(sample, dict):
            sample["source"] = name
        return sample


class TrainStream(ShardStream):
    """Training: `batches_per_epoch` whole batches of `batch_size` per rank and epoch (None: endless),
    each reader's epoch slice of the shards through a shuffle buffer of `shuffle_buffer` samples, the
    sources drawn by weight; set `epoch` before iterating (the loader of `ShardDataModule` does)."""

    train = True

    def __init__(
        self,
        urls: Sequence[str] | Sequence[Source],
        processor: Callable[[dict], dict],
        *,
        shuffle_buffer: int = 1000,
        batch_size: int = 1,
        batches_per_epoch: int | None = None,
        epoch: int = 0,
        **common,
    ) -> None:
        """`common`: ShardStream's rank, world_size, seed, name, limits."""
        super().__init__(urls, processor, **common)
        self.shuffle_buffer = shuffle_buffer
        self.batch_size, self.batches_per_epoch, self.epoch = batch_size, batches_per_epoch, epoch

    def __len__(self) -> int:
        """Samples per rank and epoch (training with a finite epoch only)."""
        if self.batches_per_epoch is None:
            raise TypeError("this stream has no length: an endless training epoch")
        return self.batches_per_epoch * self.batch_size

    def check_readers(self, num_workers: int) -> None:
        """Every reader (rank x worker) needs a shard of every source."""
        readers = self.world_size * num_workers
        for source in self.sources:
            if len(source.urls) < readers:
                named = f"source {source.name!r}: " if len(self.sources) > 1 else ""
                raise ValueError(
                    f"{named}{len(source.urls)} training shard(s) for {self.world_size} rank(s) x "
                    f"{num_workers} worker(s): need at least one shard per reader; write smaller shards "
                    f"or use fewer workers (data.num_workers)"
                )

    def epoch_shards(self, source: int, worker: int, num_workers: int) -> list[str]:
        """This reader's shards of a source in the current epoch: a slice of the epoch's shuffle."""
        self.check_readers(num_workers)
        order = list(self.sources[source].urls)
        random.Random(stable_seed(self.seed, self.epoch, self.sources[source].name)).shuffle(order)
        return order[self.rank * num_workers + worker :: self.world_size * num_workers]

    def reader_rng(self, worker: int) -> random.Random:
        return random.Random(stable_seed(self.seed, self.epoch, self.rank, worker))

    def train_shards(self, source: int = 0, rng: random.Random | None = None) -> Iterator[dict]:
        """This reader's shards of a source, endlessly: its epoch slice, reshuffled every pass; after
        each pass `{"url": None}` marks the end."""
        worker, num_workers = self._worker()
        mine = self.epoch_shards(source, worker, num_workers)
        rng = rng or self.reader_rng(worker)
        while True:
            for url in mine:
                yield {"url": url}
            yield {"url": None}
            rng.shuffle(mine)

    def _raw_train(self, source: int, rng: random.Random) -> Iterator:
        """Raw samples of one source for this reader, through the shuffle buffer; `_PASS_END` after
        each pass over its shards."""
        buffer = max(1, self.shuffle_buffer // len(self.sources))
        shards = self.train_shards(source, rng)
        while True:
            urls = []
            for shard in shards:
                if shard["url"] is None:
                    break
                urls.append(shard["url"])
            yield from shuffled(read_shards(urls, limits=self.limits), buffer, rng)
            yield _PASS_END

    def _train_samples(self, worker: int, num_workers: int) -> Iterator[dict]:
        rng = self.reader_rng(worker)
        streams = [self._raw_train(i, rng) for i in range(len(self.sources))]
        weights = [s.weight for s in self.sources]
        good_in_pass = [0] * len(self.sources)
        quota = None
        if self.batches_per_epoch is not None:
            batches = self.batches_per_epoch // num_workers + (worker < self.batches_per_epoch % num_workers)
            quota = batches * self.batch_size
        produced = 0
        while quota is None or produced < quota:
            i = rng.choices(range(len(streams)), weights)[0] if len(streams) > 1 else 0
            while True:  # the next usable sample of source i
                raw = next(streams[i])
                if raw is _PASS_END:
                    if not good_in_pass[i]:
                        source = self.sources[i]
                        raise RuntimeError(
                            f"source {source.name!r}: no usable sample in a whole pass over this reader's "
                            f"shards (rank {self.rank}, worker {worker}: "
                            f"{self.epoch_shards(i, worker, num_workers)}); see the skipped counts above"
                        )
                    good_in_pass[i] = 0
                    continue
                sample = self._process(raw, self.sources[i].name)
                if sample is not None:
                    good_in_pass[i] += 1
                    break
            produced += 1
            yield sample

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = self._worker()
        return hold_last(self._train_samples(worker, num_workers))


class EvalStream(ShardStream):
    """Evaluation: every shard once, in order; rank r keeps samples r, r + world, ...; with
    `samples_per_rank`, exactly that many usable samples per rank (a rank short of them repeats its
    own), so every rank runs the same number of batches."""

    train = False

    def __init__(
        self,
        urls: Sequence[str] | Sequence[Source],
        processor: Callable[[dict], dict],
        *,
        samples_per_rank: int | None = None,
        **common,
    ) -> None:
        """`common`: ShardStream's rank, world_size, name, limits."""
        super().__init__(urls, processor, **common)
        self.samples_per_rank = samples_per_rank

    def _eval_raw(self, worker: int, num_workers: int, quiet: bool = False) -> Iterator[dict]:
        """Raw samples r, r + world, ... of the shards (capped at `samples_per_rank`), this worker's
        every num_workers-th of them."""
        kept = 0
        for index, raw in enumerate(read_shards(self.urls, quiet, self.limits)):
            if index % self.world_size != self.rank:
                continue
            if self.samples_per_rank is not None and kept >= self.samples_per_rank:
                return
            if kept % num_workers == worker:
                yield raw
            kept += 1

    def _eval_samples(self, worker: int, num_workers: int) -> Iterator[dict]:
        name = self.sources[0].name
        if self.samples_per_rank is None:
            for raw in self._eval_raw(worker, num_workers):
                sample = self._process(raw, name)
                if sample is not None:
                    yield sample
            return
        quota = self.samples_per_rank // num_workers + (worker < self.samples_per_rank % num_workers)
        produced = passes = 0
        while produced < quota:
            good, quiet = 0, passes > 0  # a repeat pass does not count the bad samples again
            for raw in self._eval_raw(worker, num_workers, quiet):
                sample = self._process(raw, name, quiet)
                if sample is None:
                    continue
                good += 1
                produced += 1
                yield sample
                if produced == quota:
                    return
            passes += 1
            if not good:
                raise RuntimeError(
                    f"evaluation: rank {self.rank} worker {worker} has no usable sample of its "
                    f"{quota} in {len(self.urls)} shard(s) ({self.urls[0]}, ...); see the skipped counts"
                )
            if passes == 1:
                log.warning(
                    "evaluation: rank %d worker %d has %d usable sample(s) for its %d; repeating them so "
                    "every rank runs the same number of batches",
                    self.rank,
                    worker,
                    good,
                    quota,
                )

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = self._worker()
        return hold_last(self._eval_samples(worker, num_workers))
