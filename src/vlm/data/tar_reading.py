"""Reading webdataset shards: tar members bounded by `ReadLimits`, grouped into raw samples (one bad
member or shard is skipped and counted, never fatal), and the samples a split holds, from `index.json`
or the tar headers."""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from webdataset.gopen import gopen

from vlm.data.images import MAX_IMAGE_PIXELS, ImageTooLarge, open_image
from vlm.data.processing import (
    IMAGE_EXTENSIONS,
    SkipCounter,
)
from vlm.data.shards import INDEX_FILE, BoundedTarInfo, UnboundedHeader, is_hidden, split_name
from vlm.data.skips import Skip

log = logging.getLogger(__name__)
# a page scan is a few MB; 64 MiB leaves room for large pages and bounds what one member can cost
MAX_MEMBER_BYTES = 64 * 2**20


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
