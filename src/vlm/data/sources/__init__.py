"""Raw dataset formats -> samples in the common schema (`vlm.data.shards`): what the converters share.

A converter lists a split's items in a fixed order (`Split`, cheap: no image is read) and turns one item
into a sample (a picklable callable, the expensive part: read, verify, rasterise). The resumable writer
(`vlm.data.prepare.write_dataset`) asks for the items from any position, so a re-run skips the items
of the shards already written without converting them. An item that cannot become a sample raises
`Skip(reason, message)` (`vlm.data.skips`, the type the streams skip by too) and is counted under
`reason` in `index.json`.

Files named by an annotation are read only from inside the folders given for them (`path_under`,
symlinks resolved: `outside_root`), and only when they are regular files (`read_file`: `not_a_file`
for a pipe, device or folder); an image is skipped as `image_too_large` above `MAX_IMAGE_PIXELS`
before its pixels are decoded.
"""

from __future__ import annotations

import glob
import io
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlm.data.images import MAX_IMAGE_PIXELS, to_rgb
from vlm.data.skips import Skip

# what the training reader (vlm.data.processing.IMAGE_EXTENSIONS) decodes, by Pillow format name
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class Split:
    """One split to convert.

    `read(start)` yields the payloads of items start, start+1, ... in the split's fixed order;
    `key(index, payload)` names item `index` (unique in the split, no dots or slashes);
    `listing_skips` are (reason, key, message) of records found unusable while listing (not items).
    """

    name: str
    inputs: list[str]
    total: int
    read: Callable[[int], Iterator[Any]]
    key: Callable[[int, Any], str]
    listing_skips: list[tuple[str, str, str]] = field(default_factory=list)


def safe_key(text: object) -> str:
    """A webdataset key from any id: runs of characters other than letters, digits, `_`, `-` -> `_`."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(text)).strip("_") or "_"


def checked_image(data: bytes, decode: bool = True) -> tuple[bytes, str, tuple[int, int]]:
    """(bytes, extension, (width, height)) of an encoded image, or Skip('corrupt_image' | 'image_too_large').

    JPEG, PNG and WebP are kept byte for byte; other formats (TIFF, GIF, BMP, ...) are re-encoded as
    PNG. The size is checked from the header first; Pillow's `verify()` checks the headers (and PNG's
    checksums); `decode=True` also decodes the pixels, which catches truncated files that `verify()`
    lets through.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, size = image.format, image.size
            check_pixels(*size)
            image.verify()
        if decode or fmt not in FORMAT_EXT:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                if fmt not in FORMAT_EXT:
                    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
                        image = to_rgb(image)
                    return encode_image(image, "png"), "png", size
    except Skip:
        raise
    except Image.DecompressionBombError as error:  # Pillow's own limit, raised while reading the header
        raise Skip("image_too_large", str(error)) from error
    except Exception as error:
        message = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "data", str(error))  # no addresses: reproducible
        raise Skip("corrupt_image", f"{type(error).__name__}: {message}") from error
    return data, FORMAT_EXT[fmt], size


def check_pixels(width: float, height: float) -> None:
    """Skip('image_too_large') for an image of more than MAX_IMAGE_PIXELS."""
    if width * height > MAX_IMAGE_PIXELS:
        raise Skip(
            "image_too_large",
            f"{width:.0f}x{height:.0f} pixels, more than {MAX_IMAGE_PIXELS} (MAX_IMAGE_PIXELS)",
        )


def encode_image(image: Image.Image, fmt: str = "png", quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        to_rgb(image).save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def path_under(root: str | Path, name: str) -> Path:
    """`root / name` with symlinks resolved, or Skip('outside_root') when that leads out of `root`
    (`..`, an absolute name, a link to elsewhere)."""
    folder = Path(root).resolve()
    path = (folder / name).resolve()
    if not path.is_relative_to(folder):
        raise Skip("outside_root", f"{name} is {path}, outside {folder}")
    return path


def read_file(path: Path, reason: str = "missing_image") -> bytes:
    """A regular file's bytes; Skip(reason) when it is not there or cannot be read, Skip('not_a_file')
    for a pipe, device or folder (opened without blocking, checked before reading)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as error:
        raise Skip(reason, str(path)) from error
    except OSError as error:
        raise Skip(reason, f"{path}: {type(error).__name__}: {error}") from error
    with open(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise Skip("not_a_file", f"{path} is not a regular file")
        try:
            return file.read()
        except OSError as error:
            raise Skip(reason, f"{path}: {type(error).__name__}: {error}") from error


def expand_paths(specs: str | Path | Sequence[str | Path], suffixes: Sequence[str]) -> list[Path]:
    """Input files from paths, globs, comma-separated lists and folders (searched recursively for
    `suffixes`), each group sorted; an entry that matches nothing is an error."""
    items = [specs] if isinstance(specs, str | Path) else list(specs)
    parts = [part for item in items for part in str(item).split(",") if part]
    paths: list[Path] = []
    for part in parts:
        if any(c in part for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(part, recursive=True))
        elif Path(part).is_dir():
            found = sorted(
                p for p in Path(part).rglob("*") if p.is_file() and p.name.endswith(tuple(suffixes))
            )
        else:
            found = [Path(part)] if Path(part).exists() else []
        if not found:
            raise FileNotFoundError(f"no input matches {part!r} (expected {', '.join(suffixes)} files)")
        paths.extend(found)
    return paths


def parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def iter_parquet(path: Path, start: int, columns: Sequence[str] | None = None) -> Iterator[dict]:
    """Rows of a parquet file from row `start` on, as dicts of the wanted columns that exist; whole row
    groups before `start` are not read."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = set(parquet.schema_arrow.names)
    wanted = None if columns is None else [c for c in columns if c in names]
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if start >= rows:
            start -= rows
            continue
        table = parquet.read_row_group(group, columns=wanted)
        for batch in table.to_batches(max_chunksize=64):
            for row in batch.to_pylist():
                if start:
                    start -= 1
                    continue
                yield row


def concat_reads(
    parts: Sequence[tuple[int, Callable[[int], Iterator[Any]]]],
) -> Callable[[int], Iterator[Any]]:
    """One reader over several inputs given as (item count, reader from a position) in order."""

    def read(start: int) -> Iterator[Any]:
        for count, part in parts:
            if start >= count:
                start -= count
                continue
            yield from part(start)
            start = 0

    return read


def parse_split_specs(values: Sequence[str] | None) -> dict[str, list[str]]:
    """`NAME=SPEC` command-line values -> {name: [spec, ...]} (a name may repeat)."""
    splits: dict[str, list[str]] = {}
    for value in values or []:
        name, sep, spec = value.partition("=")
        if not sep or not name or not spec:
            raise ValueError(f"--split wants NAME=PATH, got {value!r}")
        splits.setdefault(check_name(name, "split"), []).append(spec)
    return splits


def check_name(name: str, what: str) -> str:
    """A split name or shard prefix: one folder or file name inside --out, nothing that leads out of it."""
    if not SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"--{what} {name!r}: a {what} name is one name inside --out "
            "(letters, digits, '.', '_', '-'; not '.' or '..')"
        )
    return name


def split_path_dir(spec: str) -> tuple[str, str | None]:
    """`PATH:DIR` -> (PATH, DIR); a spec without a colon -> (spec, None)."""
    path, sep, folder = spec.rpartition(":")
    return (path, folder) if sep and path and folder else (spec, None)


def add_split_argument(parser, metavar: str, help: str, required: bool = True) -> None:
    """The repeatable `--split NAME=...` option every converter takes."""
    parser.add_argument("--split", action="append", required=required, metavar=metavar, help=help)


def add_common_arguments(parser) -> None:
    """The writer's options, the same for every source."""
    group = parser.add_argument_group("output")
    group.add_argument(
        "--out", required=True, type=Path, help="output folder: <out>/<split>/<prefix>-NNNNNN.tar"
    )
    group.add_argument("--samples-per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    group.add_argument("--prefix", default=None, help="shard name prefix (default: the source name)")
    group.add_argument("--workers", type=int, default=1, help="processes converting items (default 1)")
    group.add_argument("--limit", type=int, default=None, help="convert only the first N items of each split")
    group.add_argument(
        "--overwrite", action="store_true", help="discard shards written before for these splits (no resume)"
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def common_kwargs(args) -> dict:
    return {
        "out": args.out,
        "samples_per_shard": args.samples_per_shard,
        "prefix": args.prefix and check_name(args.prefix, "prefix"),
        "workers": args.workers,
        "limit": args.limit,
        "overwrite": args.overwrite,
        "progress": not args.no_progress,
    }


def check_prompt(prompt: str, images: int = 1) -> str:
    """A prompt must hold one `<image>` marker per image (`vlm.IMAGE_TOKEN`)."""
    from vlm import IMAGE_TOKEN

    if prompt.count(IMAGE_TOKEN) != images:
        raise ValueError(f"the prompt must contain {IMAGE_TOKEN} {images} time(s), got {prompt!r}")
    return prompt
