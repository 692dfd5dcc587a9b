"""Text-only data (the text share of stage 2) -> samples without an image (task `text`).

Inputs per `--split NAME=PATH` (repeatable; a path, a quoted glob, a folder or a comma-separated list):
JSON Lines files (`.jsonl`, `.jsonl.gz`; one object per line with the text under --column, default
`text`) and parquet files with a string column --column. Items: non-blank lines / rows in file order
(files sorted by name within each path).

    python -m vlm.app.prepare text --out data/text --split train='/data/text/*.jsonl' --split val=/data/text/val.parquet

A sample: key `text-<item number, 9 digits>`, no image, prompt "" (no <image> marker), answers [text]
(the text as it is), meta {source, file, line (JSONL, 1-based) or row (parquet, 0-based)}.
Skipped: no_text (empty or whitespace-only text), bad_encoding (a JSONL line that is not UTF-8; the
message names the file and line), malformed (a line that is not a JSON object, a missing column, a
value that is not a string).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from vlm.data.sources import (
    Skip,
    Split,
    add_split_argument,
    common_kwargs,
    concat_reads,
    expand_paths,
    iter_parquet,
    parquet_rows,
)

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


@dataclass
class TextConverter:
    column: str = "text"

    def __call__(self, key: str, item: dict) -> dict:
        if "line" in item:
            place = f"{item['file']} line {item['line']}"
            try:
                line = item["raw"].decode("utf-8")
            except UnicodeDecodeError as error:
                raise Skip("bad_encoding", f"{place}: {error}") from error
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as error:  # RecursionError: nested too deep
                raise Skip("malformed", f"{place}: {error}") from error
            where = {"line": item["line"]}
        else:
            record, where = item["raw"], {"row": item["row"]}
        if not isinstance(record, dict) or self.column not in record:
            raise Skip("malformed", f"no {self.column!r} field")
        text = record[self.column]
        if text is None:
            raise Skip("no_text")
        if not isinstance(text, str):
            raise Skip("malformed", f"{self.column!r} is {type(text).__name__}, not a string")
        if not text.strip():
            raise Skip("no_text")
        return {
            "image": None,
            "task": "text",
            "prompt": "",
            "answers": [text],
            "meta": {"source": "text", "file": item["file"], **where},
        }


def _open(path: Path):
    """Binary: each line is decoded on its own, so one that is not UTF-8 is skipped, not the file."""
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def _jsonl_part(path: Path) -> tuple[int, object]:
    with _open(path) as f:
        count = sum(1 for line in f if line.strip())

    def read(start: int):
        with _open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if start:
                    start -= 1
                    continue
                yield {"file": path.name, "line": number, "raw": line}

    return count, read


def _parquet_part(path: Path, column: str) -> tuple[int, object]:
    def read(start: int):
        for row_number, row in enumerate(iter_parquet(path, start, [column]), start):
            yield {"file": path.name, "row": row_number, "raw": row}

    return parquet_rows(path), read


def text_split(name: str, inputs: str | Path | list, column: str = "text") -> Split:
    paths = expand_paths(inputs, SUFFIXES)
    parts = []
    for path in paths:
        if path.suffix == ".parquet":
            parts.append(_parquet_part(path, column))
        elif path.name.endswith((".jsonl", ".jsonl.gz", ".json")):
            parts.append(_jsonl_part(path))
        else:
            raise ValueError(f"{path}: text inputs are .jsonl(.gz) or .parquet files")
    return Split(
        name=name,
        inputs=[str(p.resolve()) for p in paths],
        total=sum(count for count, _ in parts),
        read=concat_reads(parts),
        key=lambda index, item: f"text-{index:09d}",
    )


def prepare_text(
    out: str | Path, splits: dict[str, str | Path | list], column: str = "text", **write_kwargs
) -> dict:
    """JSONL / parquet text -> text-only shards under `out`; returns index.json's content.

    `splits` = {name: a path, glob, folder or list of them}. `write_kwargs` go to
    `vlm.data.prepare.write_dataset`.
    """
    from vlm.data.prepare import write_dataset

    converter = TextConverter(column)
    plans = [text_split(name, inputs, column) for name, inputs in splits.items()]
    return write_dataset(out, "text", plans, converter, asdict(converter), **write_kwargs)


def add_arguments(parser) -> None:
    add_split_argument(
        parser,
        "NAME=PATH",
        "a split from .jsonl(.gz) / .parquet files: a path, a quoted glob, a folder or a comma-separated list (repeatable)",
    )
    parser.add_argument("--column", default="text", help="the JSON field / parquet column with the text")


def run(args) -> dict:
    from vlm.data.sources import parse_split_specs

    return prepare_text(splits=parse_split_specs(args.split), column=args.column, **common_kwargs(args))
