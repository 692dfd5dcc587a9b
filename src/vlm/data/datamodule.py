"""A LightningDataModule that streams webdataset shards on one CPU or many GPUs.

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

Bad data (corrupt or missing images, malformed records, truncated or unreadable tars, empty text,
members or images over `ReadLimits`, tar members of no sample) is skipped, counted by reason
(`SkipCounter`) and reported per batch (`skipped`), in `summary()` and in a log line at the end of
fitting; one bad item never stops or stalls a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen

from vlm.data.images import MAX_IMAGE_PIXELS, ImageTooLarge, open_image
from vlm.data.processing import (
    IMAGE_EXTENSIONS,
    Collator,
    PackingCollator,
    SampleProcessor,
    SkipCounter,
)
from vlm.data.shards import INDEX_FILE, BoundedTarInfo, UnboundedHeader, expand_urls, is_hidden, split_name
from vlm.data.skips import Skip

log = logging.getLogger(__name__)
# a page scan is a few MB; 64 MiB leaves room for large pages and bounds what one member can cost
MAX_MEMBER_BYTES = 64 * 2**20

# our training streams report their exact length (whole batches per worker); Lightning's generic
# warning about IterableDataset lengths with several workers does not apply
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


# -- reading shards ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReadLimits:
    """What one tar member may cost, checked from headers before it is read or decoded: its size
    (`data.max_member_bytes`; only one member is held at a time, so this also bounds the memory a
    compressed shard takes however far it inflates) and, for an image, its pixels
    (`data.max_image_pixels`)."""

    max_member_bytes: int = MAX_MEMBER_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS


def read_shard(url: str, quiet: bool = False, limits: ReadLimits = ReadLimits()) -> Iterator[dict]:
    """Raw samples (`{__key__, __url__, <ext>: bytes}`) of one tar shard, members grouped by key.

    A sample with a member over `limits` is dropped (`too_large`, `image_too_large`) before that
    member is read; members of no sample (hidden names as `.x`, `__MACOSX/...`: `hidden_member`; no
    extension, links, devices: `stray_member`) are skipped. A shard that cannot be opened counts as
    `unreadable_tar`; one that breaks off in the middle as `truncated_tar` (or `too_large`, at a
    header too large to read): the complete samples before the break are used, the one being read is
    dropped, and reading goes on with the next shard. `quiet`: count nothing (a second pass over the
    same data).
    """

    def skip(error: Skip) -> None:
        if not quiet:
            SkipCounter.add(error)

    members, current, dropped = 0, None, False
    try:
        with gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=BoundedTarInfo) as tar:
            for info in _headers(tar):
                members += 1
                name = split_name(info.name) if info.isreg() else None
                if name is None:
                    if not info.isdir():
                        reason = "hidden_member" if is_hidden(info.name) else "stray_member"
                        skip(Skip(reason, f"in {url}: {member_kind(info)}", key=info.name))
                    continue
                key, ext = name
                if current is not None and key != current["__key__"]:
                    if not dropped:
                        yield current
                    current = None
                if current is None:
                    current, dropped = {"__key__": key, "__url__": url}, False
                if dropped:  # a member of this sample was over the limits: the rest is not read
                    continue
                try:
                    current[ext] = read_member(tar, info, key, url, limits)
                except Skip as error:
                    skip(error)
                    dropped = True
        if current is not None and not dropped:
            yield current
    except Exception as error:
        reason = "truncated_tar" if members else "unreadable_tar"
        if isinstance(error, UnboundedHeader):
            reason = "too_large"
        skip(Skip(reason, f"{type(error).__name__}: {error}", key=url))


def _headers(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """A tar's members in order, none kept: tarfile remembers every header it reads, which a shard of
    many tiny members (or a compressed one that inflates to them) would make unbounded."""
    for info in tar:
        tar.members = []
        yield info


def read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, key: str, url: str, limits: ReadLimits) -> bytes:
    """A sample's member, read once its size (and for an image, its pixel count) is within `limits`;
    else Skip (`too_large`, `image_too_large`) naming the shard and the member."""
    where = f"{url}: {info.name}"
    if info.size > limits.max_member_bytes:
        raise Skip("too_large", f"{where}: {info.size} bytes, over {limits.max_member_bytes}", key=key)
    data = tar.extractfile(info).read()
    if info.name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS:
        try:
            open_image(data, limits.max_image_pixels)
        except ImageTooLarge as error:
            raise Skip("image_too_large", f"{where}: {error}", key=key) from error
        except Exception:  # not an image at all: decoding says so (corrupt_image)
            pass
    return data


def member_kind(info: tarfile.TarInfo) -> str:
    if info.isreg():
        return "a hidden name" if is_hidden(info.name) else "a name without an extension"
    return "a link" if info.issym() or info.islnk() else "not a file (a device or fifo)"


def read_shards(
    urls: Iterable[str], quiet: bool = False, limits: ReadLimits = ReadLimits()
) -> Iterator[dict]:
    for url in urls:
        yield from read_shard(url, quiet, limits)


def is_local(url: str) -> bool:
    return url.startswith("file://") or ("://" not in url and not url.startswith("pipe:"))


def _tar_members(url: str) -> Iterator[tarfile.TarInfo]:
    if is_local(url):  # random access: headers only, the data is skipped by seeking
        with tarfile.open(url.removeprefix("file://"), tarinfo=BoundedTarInfo) as tar:
            yield from _headers(tar)
    else:
        with gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=BoundedTarInfo) as tar:
            yield from _headers(tar)


def count_samples(urls: Sequence[str]) -> int:
    """Samples in the shards, from the tar headers (local files are not read through; remote ones are
    downloaded once), as `read_shard` groups them (a run of members with one key) before any is
    skipped. A shard that breaks off counts the samples before the break."""
    total = 0
    for url in urls:
        samples, last = 0, None
        try:
            for member in _tar_members(url):
                parts = split_name(member.name) if member.isreg() else None
                if parts is not None and parts[0] != last:
                    samples, last = samples + 1, parts[0]
        except Exception as error:
            log.warning("counting %s: %s: %s (%d samples before)", url, type(error).__name__, error, samples)
        total += samples
    return total


def _shard_entries(shards) -> dict[str, int | None]:
    """An index's shard list (names or {name|path|url, samples}) -> {basename: samples or None}."""
    entries: dict[str, int | None] = {}
    for shard in shards or []:
        if isinstance(shard, dict):
            name = shard.get("name") or shard.get("path") or shard.get("url") or ""
            entries[Path(name).name] = shard.get("samples")
        else:
            entries[Path(str(shard)).name] = None
    return entries


def index_count(urls: Sequence[str], split: str) -> int | None:
    """Samples in these shards according to an `index.json` next to them or one folder up (as the
    converters write `<root>/<split>/*.tar` + `<root>/index.json`); None when no index says."""
    local = [url.removeprefix("file://") for url in urls if is_local(url)]
    if not local or len(local) != len(urls):
        return None
    wanted = {Path(url).name for url in local}
    first = Path(local[0])
    for folder in (first.parent, first.parent.parent):
        path = folder / INDEX_FILE
        if not path.is_file():
            continue
        try:
            splits = json.loads(path.read_text()).get("splits", {})
        except (OSError, ValueError, AttributeError):
            continue
        for name, info in splits.items():
            if not isinstance(info, dict):
                continue
            entries = _shard_entries(info.get("shards"))
            if entries and set(entries) == wanted and info.get("samples") is not None:
                return int(info["samples"])
            if entries and wanted <= set(entries) and all(entries[w] is not None for w in wanted):
                return sum(entries[w] for w in wanted)
            in_split_folder = all(Path(url).parent.name == name for url in local)
            if not entries and name == split and in_split_folder and info.get("samples") is not None:
                return int(info["samples"])
    return None


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
    """Processed samples from shards, split by rank and dataloader worker (see the module docstring).

    `urls` is a list of shard URLs (one source called `name`) or of `Source`s mixed by weight.
    Training: `batches_per_epoch` whole batches of `batch_size` per rank and epoch (None: endless);
    set `epoch` before iterating (the loader of `ShardDataModule` does). Evaluation:
    `samples_per_rank` usable samples per rank (None: all of the rank's samples). `limits` bound what
    one tar member may cost (`ReadLimits`).
    """

    def __init__(
        self,
        urls: Sequence[str] | Sequence[Source],
        processor: Callable[[dict], dict],
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        samples_per_rank: int | None = None,
        batch_size: int = 1,
        batches_per_epoch: int | None = None,
        epoch: int = 0,
        name: str = "data",
        limits: ReadLimits = ReadLimits(),
    ) -> None:
        urls = list(urls)
        self.sources = urls if urls and isinstance(urls[0], Source) else [Source(name, urls)]
        self.processor, self.train = processor, train
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.samples_per_rank = shuffle_buffer, samples_per_rank
        self.batch_size, self.batches_per_epoch, self.epoch = batch_size, batches_per_epoch, epoch
        self.limits = limits
        if any(s.weight < 0 for s in self.sources) or sum(s.weight for s in self.sources) <= 0:
            raise ValueError(f"source weights must be >= 0 and not all 0: {self.weights()}")

    @property
    def urls(self) -> list[str]:
        return [url for source in self.sources for url in source.urls]

    def weights(self) -> dict[str, float]:
        return {s.name: s.weight for s in self.sources}

    def __len__(self) -> int:
        """Samples per rank and epoch (training with a finite epoch only)."""
        if not self.train or self.batches_per_epoch is None:
            raise TypeError("this stream has no length: evaluation, or an endless training epoch")
        return self.batches_per_epoch * self.batch_size

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

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
        if self.train:
            return hold_last(self._train_samples(worker, num_workers))
        return hold_last(self._eval_samples(worker, num_workers))


# -- batches, loaders and the end-of-run report -------------------------------------------------------
class SourceCollator:
    """A collator (`Collator`, or `PackingCollator` for packed training rows) whose batches also count
    their samples per source (every source named, zeros included, so every rank logs the same keys)."""

    def __init__(self, collator: Collator, names: Sequence[str]) -> None:
        self.collator = collator
        self.names = list(names)

    def __call__(self, samples: list[dict]) -> dict:
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

    def add(self, split: str, batch: dict) -> None:
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
        stream = ShardStream(
            sources,
            self.processor_factory(True),
            train=True,
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
        stream = ShardStream(
            urls,
            self.processor_factory(False),
            train=False,
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
