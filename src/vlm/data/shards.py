"""Webdataset shards in the common sample schema, the same for every source.

A sample is `{key, image (encoded bytes or None), image_ext, task, prompt, answers, meta}`; in a tar it
is `<key>.<image_ext>` (the image) and `<key>.json` (everything else).

A sample with several images (the pages of a document) has `images` (a list of encoded bytes, all of
`image_ext`) instead of `image`; in a tar they are `<key>.0.<image_ext>`, `<key>.1.<image_ext>`, ...,
in order (webdataset groups them under the key with extensions `0.png`, `1.png`, ...). The reader
(`vlm.data.processing.image_members`) takes them by index; its prompt has one `<image>` per page.
"""

from __future__ import annotations

import glob
import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

INDEX_FILE = "index.json"
TAR_FORMAT = tarfile.GNU_FORMAT  # long names as GNU records; the usual member needs one header
# a long name or pax header: tarfile reads it whole into memory before the member is seen
MAX_HEADER_BYTES = 1 << 20
EXTENDED_HEADERS = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


def to_tar_entry(sample: dict) -> dict:
    entry = {
        "__key__": sample["key"],
        "json": json.dumps(
            {
                "task": sample["task"],
                "prompt": sample["prompt"],
                "answers": list(sample["answers"]),
                "meta": sample.get("meta", {}),
            }
        ).encode(),
    }
    ext = sample.get("image_ext", "png")
    if sample.get("images") is not None:
        if sample.get("image") is not None:
            raise ValueError(f"sample {sample['key']!r} has both `image` and `images`; give one")
        entry |= {f"{i}.{ext}": page for i, page in enumerate(sample["images"])}
    elif sample.get("image") is not None:
        entry[ext] = sample["image"]
    return entry


def write_shards(samples: Iterable[dict], out_dir: Path, prefix: str, samples_per_shard: int) -> list[str]:
    """Write `prefix-000000.tar`, ... under out_dir (`add_to_tar`); return the shard paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    tar: tarfile.TarFile | None = None
    try:
        for i, sample in enumerate(samples):
            if i % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                paths.append(str(out_dir / f"{prefix}-{len(paths):06d}.tar"))
                tar = tarfile.open(paths[-1], "w", format=TAR_FORMAT)  # noqa: SIM115 (open across samples)
            add_to_tar(tar, sample)
    finally:
        if tar is not None:
            tar.close()
    return paths


def add_to_tar(tar: tarfile.TarFile, sample: dict) -> None:
    """Append one sample to an open tar (`TAR_FORMAT`), byte-reproducibly (fixed mtime, owner and mode).

    An integer mtime and short names keep every member to one 512-byte header: a float mtime (as
    `time.time()`) would make tarfile add a pax header per member, which doubles the reading cost."""
    entry = to_tar_entry(sample)
    key = entry.pop("__key__")
    for ext, data in entry.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uname = info.gname = "vlm"
        tar.addfile(info, io.BytesIO(data))


class UnboundedHeader(tarfile.HeaderError):
    """A tar header that would take unbounded memory to read (see `BoundedTarInfo`)."""


class BoundedTarInfo(tarfile.TarInfo):
    """The TarInfo to read shards with (`tarfile.open(..., tarinfo=BoundedTarInfo)`): it raises
    `UnboundedHeader` instead of reading into memory a long-name or pax header over
    `MAX_HEADER_BYTES`, or a sparse map spread over extra blocks (tarfile collects those without a
    limit). A member's own size is the reader's to check: tarfile reads no data until asked."""

    def _proc_member(self, archive):
        if self.type in EXTENDED_HEADERS and self.size > MAX_HEADER_BYTES:
            raise UnboundedHeader(f"a {self.size}-byte extended header, over {MAX_HEADER_BYTES}")
        if self.type == tarfile.GNUTYPE_SPARSE and self._sparse_structs[1]:
            raise UnboundedHeader("a GNU sparse member with extended sparse headers")
        return super()._proc_member(archive)

    def _proc_gnusparse_10(self, member, pax_headers, archive):
        raise UnboundedHeader("a GNU 1.0 sparse member (its map is read from the data)")


def is_hidden(name: str) -> bool:
    """A member name that starts with `.` or `__`, or lies in such a folder (`__MACOSX/`, `._key.png`)."""
    return any(part.startswith((".", "__")) for part in name.split("/") if part not in ("", "."))


def split_name(name: str) -> tuple[str, str] | None:
    """`dir/key.ext.more` -> (`dir/key`, `ext.more`), as webdataset groups tar members; None for a
    name without an extension and for hidden ones (`is_hidden`)."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or is_hidden(name):
        return None
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def tar_keys(path: Path) -> list[str]:
    """The sample keys in a shard, in order, as webdataset groups its members (`split_name`)."""
    with tarfile.open(path, tarinfo=BoundedTarInfo) as tar:
        names = [split_name(info.name) for info in tar if info.isreg()]
    return list(dict.fromkeys(name[0] for name in names if name is not None))


def expand_urls(urls: str | Iterable[str]) -> list[str]:
    """Shard URLs from a glob, a brace pattern (`a-{000..009}.tar`), a `::`-separated string or a list."""
    import webdataset as wds

    items = [urls] if isinstance(urls, str) else list(urls)
    expanded: list[str] = []
    for item in items:
        for url in wds.shardlists.expand_urls(item):
            matches = sorted(glob.glob(url)) if any(c in url for c in "*?[") else [url]
            expanded.extend(matches)
    if not expanded:
        raise FileNotFoundError(f"no shards match {urls!r}")
    return expanded


def write_index(directory: Path, info: dict) -> None:
    (directory / INDEX_FILE).write_text(json.dumps(info, indent=2))


def read_index(directory: Path) -> dict | None:
    path = directory / INDEX_FILE
    return json.loads(path.read_text()) if path.exists() else None
