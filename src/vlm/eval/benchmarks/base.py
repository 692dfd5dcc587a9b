"""What every benchmark is: ground-truth items, predictions in the benchmark's own format, a score.

A benchmark works in two modes (see `vlm.eval.runner`):
- with a checkpoint, our model generates an answer for each item (batched, the benchmark's prompt) and
  the answers are written in the benchmark's own prediction format;
- with `predictions=DIR|FILE`, any model's existing outputs in that format are read instead.
Either way the same `score` turns items + predictions into a `Result`, which the runner writes as
metrics.json, report.md, samples.jsonl and PNG plots, and logs to the configured loggers.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

log = logging.getLogger(__name__)


ImageSource = Path | bytes | Image.Image


@dataclass
class Item:
    """One thing to answer: an image (a path, encoded bytes or a PIL image) or a list of them (the pages
    of a document, one `<image>` each in the prompt), a prompt, the references."""

    key: str
    image: ImageSource | list[ImageSource] | None
    prompt: str
    answers: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def load_images(self) -> list[Image.Image]:
        """All of the item's images in order (none, one, or its pages)."""
        if self.image is None:
            return []
        return [self._load(image) for image in (self.image if isinstance(self.image, list) else [self.image])]

    def _load(self, image: ImageSource | None) -> Image.Image:
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, bytes):
            source = io.BytesIO(image)
        elif image is not None and Path(image).is_file():
            source = image
        else:
            raise FileNotFoundError(f"item {self.key!r}: image {image} does not exist")
        try:
            loaded = Image.open(source)
            loaded.load()
        except Exception as error:
            raise ValueError(f"item {self.key!r}: the image does not decode ({error})") from error
        return loaded


@dataclass
class Context:
    """What scoring may need from the model: its tokenizer and vision tokens per image (None when
    scoring another model's predictions without a checkpoint)."""

    tokenizer: Any = None
    vision_tokens_per_image: int | None = None
    image_size: tuple[int, int] | None = None  # the encoder's input (height, width)
    output_dir: Path | None = None
    datamodule: Any = None  # the run's own data (benchmark=synthetic reads its test split)
    max_length: int | None = None  # the run's tokens per sample (prompt + answer): the LLM's window
    predictions_path: Path | None = None  # predictions= of eval.py, when scoring given outputs
    generation_seconds: dict[str, float] = field(default_factory=dict)  # wall time per generation group


@dataclass
class Result:
    """Scalars (and small nested dicts) for metrics.json, one row per sample, named tables for the
    report and the loggers, plot makers (`fn(path)` saves one PNG) and notes printed loudly."""

    metrics: dict[str, Any]
    samples: list[dict] = field(default_factory=list)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    plots: dict[str, Callable[[Path], None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Benchmark:
    """Base: subclasses implement `items`, `score` and the prediction format (`write_predictions`,
    `read_predictions`); the defaults read and write one JSON object {key: prediction}."""

    name: str = "benchmark"
    batch_size: int = 8
    max_new_tokens: int = 512
    limit: int | None = None  # items; None = all

    def items(self, context: Context | None = None) -> list[Item]:
        raise NotImplementedError

    def score(self, items: list[Item], predictions: dict[str, str], context: Context) -> Result:
        raise NotImplementedError

    def limited(self, items: list[Item]) -> list[Item]:
        return items if self.limit is None else items[: self.limit]

    def generation_groups(self, items: list[Item]) -> dict[str, list[Item]]:
        """Items generated in separate passes, each timed into `Context.generation_seconds`."""
        return {"all": items}

    # -- the prediction format -------------------------------------------------------------------
    def write_predictions(self, items: list[Item], predictions: dict[str, str], out_dir: Path) -> Path:
        path = out_dir / "predictions.json"
        path.write_text(json.dumps(predictions, indent=1, ensure_ascii=False))
        return path

    def read_predictions(self, path: Path, items: list[Item]) -> dict[str, str]:
        return read_json_predictions(path)


@dataclass
class JsonRowsBenchmark(Benchmark):
    """A benchmark whose official prediction format is one JSON list of rows, one row per item, matched
    to the items by an id: subclasses say how a row is made (`to_rows`) and read (`row_id`, `row_text`)
    and which id an item has (`item_id`)."""

    predictions_file: ClassVar[str] = "predictions.json"  # its name inside a predictions directory
    row_format: ClassVar[str] = "[{...}, ...]"  # what a row looks like, for error messages

    def to_rows(self, items: list[Item], predictions: dict[str, str]) -> list[dict]:
        raise NotImplementedError

    def row_id(self, row: dict) -> Any:
        raise NotImplementedError

    def row_text(self, row: dict) -> str:
        raise NotImplementedError

    def item_id(self, item: Item) -> Any:
        return item.key

    def write_predictions(self, items: list[Item], predictions: dict[str, str], out_dir: Path) -> Path:
        path = out_dir / self.predictions_file
        rows = self.to_rows([item for item in items if item.key in predictions], predictions)
        path.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
        return path

    def read_predictions(self, path: Path, items: list[Item]) -> dict[str, str]:
        path = path / self.predictions_file if path.is_dir() else path
        try:
            texts = {self.row_id(row): self.row_text(row) for row in json.loads(path.read_text())}
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"predictions={path}: expected {self.row_format} ({error!r})") from error
        return {item.key: texts[self.item_id(item)] for item in items if self.item_id(item) in texts}


def read_json_predictions(path: Path) -> dict[str, str]:
    """{key: prediction} from a JSON object, or from the `predictions.json` inside a directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.json"
    if not path.is_file():
        raise FileNotFoundError(f"predictions={path}: no such file")
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"predictions={path}: not valid JSON ({error})") from error
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"predictions={path}: expected a JSON object {{key: predicted text}}")
    return data


def missing_predictions(items: list[Item], predictions: dict[str, str]) -> list[str]:
    return [item.key for item in items if item.key not in predictions]


def empty_for_missing(items: list[Item], predictions: dict[str, str], what: str) -> tuple[dict, list[str]]:
    """Predictions with "" for every item that has none, and a loud note naming them."""
    missing = missing_predictions(items, predictions)
    notes = []
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        notes.append(f"{len(missing)} of {len(items)} {what} have no prediction and count as empty: {shown}")
        log.warning(notes[-1])
        predictions = {**predictions, **dict.fromkeys(missing, "")}
    return predictions, notes


def shard_items(urls, limit: int | None = None, prompt: str | None = None) -> list[Item]:
    """Items from shards written by `python -m vlm.data.prepare` (key, image bytes, prompt, answers,
    meta); `prompt`, when given, replaces the shard's and may use {question} from the meta."""
    from vlm.data.datamodule import read_shards
    from vlm.data.processing import image_members
    from vlm.data.shards import expand_urls

    items = []
    for raw in read_shards(expand_urls(urls)):
        if limit is not None and len(items) >= limit:
            break
        key = raw.get("__key__", "?")
        try:
            record = json.loads(raw["json"])
            meta = record.get("meta") or {}
            text = (
                record["prompt"] if prompt is None else prompt.replace("{question}", meta.get("question", ""))
            )
            images = [data for _, data in image_members(raw)]
            image = images[0] if len(images) == 1 else images or None
            items.append(Item(key, image, text, list(record.get("answers") or []), meta))
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(f"shard sample {key!r} is not a prepared sample: {error}") from error
    return items


def bar_plot(values: dict[str, float], ylabel: str):
    """A plot maker: one bar per named value."""

    def make(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(values) + 2), 3.5))
        ax.bar(list(values), list(values.values()))
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", rotation=45)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    return make


def curve_plot(rows: list[dict], x: str, ys: tuple[str, ...], xlabel: str):
    """A plot maker: scores (0..1) in `ys` against `x`, one line each (e.g. precision vs compression)."""

    def make(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for y, marker in zip(ys, "o^sDv", strict=False):
            ax.plot([row[x] for row in rows], [row[y] for row in rows], marker=marker, label=y)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("score")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    return make


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
