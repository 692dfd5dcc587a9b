"""Official raw dataset layouts -> webdataset shards in the common sample schema, resumably.

    python -m vlm.app.prepare coco   --root /data/coco --out data/coco
    python -m vlm.app.prepare docvqa --split validation='/data/DocVQA/validation-*.parquet' --out data/docvqa
    python -m vlm.app.prepare olmocr --split train=/data/olmOCR-mix-1025-extracted/00_documents/train --out data/olmocr
    python -m vlm.app.prepare text   --split train=/data/text/part-0.jsonl --out data/text

`python -m vlm.app.prepare <source> --help` documents each source's arguments.

Output: `<out>/<split>/<prefix>-000000.tar, ...` with exactly `--samples-per-shard` samples in every
shard but the last of a split, and `<out>/index.json`: samples per split and task, the shard list per
split and the skipped items by reason (count and the first keys with their messages). Split names and
the prefix are plain names (letters, digits, `.`, `_`, `-`), so nothing is written outside `<out>`.

Resume: the items of a split come in a fixed (sorted) order; a shard is written under a temporary name
and renamed when complete, then `<out>/<split>/_progress.json` records it with the number of items it
consumed. A re-run keeps the recorded shards that are still there (same size), deletes anything after
them, and continues from the first item after the last kept shard: kept shards are not converted again,
and the rewritten ones come out byte for byte the same (fixed tar metadata, deterministic encoding).
The settings (options, inputs, item count) are recorded too; a re-run with other settings stops with an
error unless `--overwrite`.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlm.data.shards import INDEX_FILE, TAR_FORMAT, add_to_tar, read_index, tar_keys, write_index
from vlm.data.skips import Skip
from vlm.data.sources import Split, check_name

STATE_FILE = "_progress.json"
MAX_EXAMPLES = 5  # skipped items listed by key per reason in index.json
SOURCES = ("coco", "docvqa", "olmocr", "text")


class PrepareError(RuntimeError):
    """The output folder holds shards written with other settings, or another source."""


def _attempt(convert: Callable[[str, Any], dict], key: str, payload: Any) -> tuple:
    """Convert one item without raising: ("ok", sample) or ("skip", reason, message)."""
    try:
        return ("ok", convert(key, payload))
    except Skip as skip:
        return ("skip", skip.reason, skip.message)
    except Exception as error:  # bad input never stops a run; unforeseen errors are counted too
        return ("skip", "error", f"{type(error).__name__}: {error}")


def _converted(
    items: Iterator[tuple[str, Any]], convert: Callable, workers: int
) -> Iterator[tuple[str, tuple]]:
    """(key, result) in item order; with workers > 1 a process pool converts bounded batches."""
    if workers <= 1:
        for key, payload in items:
            yield key, _attempt(convert, key, payload)
        return
    from multiprocessing import Pool

    with Pool(workers) as pool:
        while batch := list(islice(items, workers * 8)):
            results = pool.starmap(_attempt, [(convert, key, payload) for key, payload in batch], chunksize=1)
            yield from zip((key for key, _ in batch), results, strict=True)


def _load_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # none yet, or unreadable: the split starts again


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def _shard_files(directory: Path, prefix: str) -> list[Path]:
    pattern = re.compile(re.escape(prefix) + r"-\d{6}\.tar(\.tmp)?$")
    return sorted(p for p in directory.glob(f"{prefix}-*") if pattern.match(p.name))


class _SplitWriter:
    """Writes one split's shards, committing each complete shard to the progress file."""

    def __init__(self, directory: Path, prefix: str, samples_per_shard: int, state: dict, state_path: Path):
        self.directory, self.prefix, self.size = directory, prefix, samples_per_shard
        self.state, self.state_path = state, state_path
        self.tar: tarfile.TarFile | None = None
        self.reset_pending()

    def reset_pending(self) -> None:
        self.count, self.tasks, self.skipped, self.no_answers = 0, Counter(), Counter(), 0

    @property
    def next_name(self) -> str:
        return f"{self.prefix}-{len(self.state['shards']):06d}.tar"

    def add(self, sample: dict, index: int) -> None:
        if self.tar is None:
            tmp = self.directory / (self.next_name + ".tmp")
            self.tar = tarfile.open(tmp, "w", format=TAR_FORMAT)  # noqa: SIM115 (open across samples)
        add_to_tar(self.tar, sample)
        self.count += 1
        self.tasks[sample["task"]] += 1
        self.no_answers += not sample["answers"]
        if self.count == self.size:
            self.commit(index + 1)

    def skip(self, index: int, key: str, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        examples = self.state["examples"].setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append({"item": index, "key": key, "message": message})

    def commit(self, items_end: int) -> None:
        """Close the shard in progress, rename it and record it (with the items it consumed)."""
        assert self.tar is not None
        name = self.next_name
        self.tar.close()
        self.tar = None
        os.replace(self.directory / (name + ".tmp"), self.directory / name)
        self.state["shards"].append(
            {
                "name": name,
                "samples": self.count,
                "bytes": (self.directory / name).stat().st_size,
                "items_end": items_end,
                "tasks": dict(self.tasks),
                "no_answers": self.no_answers,
                "skipped": dict(self.skipped),
            }
        )
        self.reset_pending()
        _save_state(self.state_path, self.state)

    def finish(self, items_end: int) -> None:
        if self.count:
            self.commit(items_end)
        self.state["tail"] = {"skipped": dict(self.skipped)}  # skips after the last sample
        self.state["complete"] = True
        _save_state(self.state_path, self.state)

    def abandon(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def _write_split(
    out: Path,
    source: str,
    split: Split,
    convert: Callable[[str, Any], dict],
    recipe: dict,
    samples_per_shard: int,
    prefix: str,
    workers: int,
    overwrite: bool,
    progress: bool,
) -> None:
    directory = out / split.name
    directory.mkdir(parents=True, exist_ok=True)
    state_path = directory / STATE_FILE
    if overwrite:
        for path in _shard_files(directory, prefix):
            path.unlink()
        state_path.unlink(missing_ok=True)
    state = _load_state(state_path)
    if state is not None and state.get("recipe") != recipe:
        changed = sorted(
            k for k in set(recipe) | set(state.get("recipe", {})) if recipe.get(k) != state["recipe"].get(k)
        )
        raise PrepareError(
            f"{directory} holds shards written with other settings ({', '.join(changed)} differ); "
            "pass --overwrite (overwrite=True) to write them again, or choose another --out"
        )
    kept: list[dict] = []
    for shard in (state or {}).get("shards", []):
        path = directory / shard["name"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            break
        kept.append(shard)
    complete = bool(state and state.get("complete") and len(kept) == len(state["shards"]))
    kept_names = {shard["name"] for shard in kept}
    for path in _shard_files(directory, prefix):
        if path.name not in kept_names:
            path.unlink()  # a temporary shard, or one written after the last kept shard
    listing = [{"reason": r, "key": k, "message": m} for r, k, m in split.listing_skips]
    if complete:
        _save_state(state_path, {**state, "listing_skipped": listing})
        return
    start = kept[-1]["items_end"] if kept else 0
    examples = {
        reason: [e for e in found if e["item"] < start]
        for reason, found in (state or {}).get("examples", {}).items()
    }
    state = {
        "recipe": recipe,
        "shards": kept,
        "complete": False,
        "tail": None,
        "examples": examples,
        "listing_skipped": listing,
    }
    _save_state(state_path, state)
    writer = _SplitWriter(directory, prefix, samples_per_shard, state, state_path)
    seen = {key for shard in kept for key in tar_keys(directory / shard["name"])}
    bar = tqdm(
        total=split.total,
        initial=start,
        desc=f"{source} {split.name}",
        unit="item",
        disable=not progress or None,
    )
    items = ((split.key(index, payload), payload) for index, payload in enumerate(split.read(start), start))
    index = start - 1
    try:
        for index, (key, result) in enumerate(_converted(items, convert, workers), start):
            bar.update(1)
            if result[0] == "skip":
                writer.skip(index, key, result[1], result[2])
            elif key in seen:
                writer.skip(index, key, "duplicate_key", "an earlier item of this split has the same key")
            else:
                seen.add(key)
                writer.add({**result[1], "key": key}, index)
        if index + 1 != split.total:
            raise PrepareError(f"{split.name}: listed {split.total} items but read {index + 1}")
        writer.finish(split.total)
    finally:
        writer.abandon()
        bar.close()


def _split_summary(name: str, state: dict) -> dict:
    shards = state["shards"]
    tasks: Counter = Counter()
    skipped: Counter = Counter()
    for shard in shards:
        tasks.update(shard["tasks"])
        skipped.update(shard["skipped"])
    if state.get("tail"):
        skipped.update(state["tail"]["skipped"])
    examples = {reason: list(found) for reason, found in state["examples"].items()}
    for entry in state.get("listing_skipped", []):
        skipped[entry["reason"]] += 1
        found = examples.setdefault(entry["reason"], [])
        if len(found) < MAX_EXAMPLES:
            found.append({"key": entry["key"], "message": entry["message"]})
    names = [shard["name"] for shard in shards]
    prefix = state["recipe"]["prefix"]
    return {
        "complete": state["complete"],
        "items": state["recipe"]["items"],
        "samples": sum(shard["samples"] for shard in shards),
        "tasks": dict(sorted(tasks.items())),
        "no_answers": sum(shard.get("no_answers", 0) for shard in shards),
        "shards": [f"{name}/{n}" for n in names],
        "urls": f"{name}/{prefix}-{{000000..{len(names) - 1:06d}}}.tar" if names else None,
        "skipped": {
            reason: {
                "count": count,
                "examples": [{"key": e["key"], "message": e["message"]} for e in examples.get(reason, [])],
            }
            for reason, count in sorted(skipped.items())
        },
    }


def build_index(out: Path, source: str, samples_per_shard: int, prefix: str) -> dict:
    """index.json from the progress files of every split under `out` written by this source and prefix."""
    splits = {}
    for state_path in sorted(out.glob(f"*/{STATE_FILE}")):
        state = _load_state(state_path)
        if state and state["recipe"].get("source") == source and state["recipe"].get("prefix") == prefix:
            splits[state_path.parent.name] = _split_summary(state_path.parent.name, state)
    tasks: Counter = Counter()
    skipped: Counter = Counter()
    for info in splits.values():
        tasks.update(info["tasks"])
        skipped.update({reason: entry["count"] for reason, entry in info["skipped"].items()})
    return {
        "source": source,
        "prefix": prefix,
        "samples_per_shard": samples_per_shard,
        "samples": sum(info["samples"] for info in splits.values()),
        "tasks": dict(sorted(tasks.items())),
        "skipped": dict(sorted(skipped.items())),
        "splits": splits,
    }


def write_dataset(
    out: str | Path,
    source: str,
    splits: Sequence[Split],
    convert: Callable[[str, Any], dict],
    options: dict,
    samples_per_shard: int = 1000,
    prefix: str | None = None,
    workers: int = 1,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Convert every split with `convert(key, payload) -> sample` into resumable shards; return the index.

    `options` are the conversion settings (recorded; a resume with other options is refused).
    """
    out = Path(out)
    prefix = check_name(prefix or source, "prefix")
    for split in splits:
        check_name(split.name, "split")
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    existing = read_index(out)
    if existing and (existing.get("source"), existing.get("prefix")) != (source, prefix) and not overwrite:
        raise PrepareError(
            f"{out / INDEX_FILE} describes {existing.get('source')} shards (prefix {existing.get('prefix')}); "
            f"write {source} into another folder"
        )
    for split in splits:
        if limit is not None:
            split.total = min(split.total, limit)
            split.read = _limited(split.read, split.total)
        recipe = {
            "source": source,
            "prefix": prefix,
            "samples_per_shard": samples_per_shard,
            "options": options,
            "inputs": split.inputs,
            "items": split.total,
            "limit": limit,
        }
        recipe = json.loads(json.dumps(recipe))  # as it reads back from the progress file
        _write_split(
            out, source, split, convert, recipe, samples_per_shard, prefix, workers, overwrite, progress
        )
        write_index(out, build_index(out, source, samples_per_shard, prefix))
    index = build_index(out, source, samples_per_shard, prefix)
    write_index(out, index)
    return index


def _limited(read: Callable[[int], Iterator[Any]], total: int) -> Callable[[int], Iterator[Any]]:
    return lambda start: islice(read(start), max(total - start, 0))


def summary(index: dict, out: str | Path = "") -> str:
    """What a run wrote, for people: samples and shards per split, skipped items by reason."""
    lines = []
    for name, info in index["splits"].items():
        tasks = ", ".join(f"{task} {count}" for task, count in info["tasks"].items()) or "no samples"
        lines.append(
            f"{name}: {info['samples']} samples ({tasks}) from {info['items']} items in {len(info['shards'])} shard(s)"
            + (f", {info['no_answers']} without answers" if info["no_answers"] else "")
            + ("" if info["complete"] else " [incomplete]")
        )
        for reason, entry in info["skipped"].items():
            shown = "; ".join(
                f"{e['key']}: {e['message']}" if e["message"] else e["key"] for e in entry["examples"][:3]
            )
            lines.append(f"  skipped {entry['count']} {reason}: {shown}")
    lines.append(f"index: {Path(out) / INDEX_FILE}")
    return "\n".join(lines)
