"""What every benchmark is: ground-truth items, predictions in the benchmark's own format, a score.

A benchmark works in two modes (see `vlm.eval.runner`):
- with a checkpoint, our model generates an answer for each item (batched, the benchmark's prompt) and
  the answers are written in the benchmark's own prediction format;
- with `predictions=DIR|FILE`, any model's existing outputs in that format are read instead.
Either way the same `score` turns items + predictions into a `Result`, which the runner writes as
metrics.json, report.md, samples.jsonl and PNG plots, and logs to the configured loggers.

Prediction files are untrusted: a row that does not parse, is nested too deeply, is not a string, is not
valid Unicode or is too long is skipped and named (file:line, reason) in `Predictions.issues`, which the
runner counts in metrics.json and lists in report.md; the other rows are scored.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from vlm.data.images import open_image
from vlm.text_accounting import DEFAULT_REFERENCES, TextAccounting

log = logging.getLogger(__name__)


ImageSource = Path | bytes | Image.Image

MAX_PREDICTION_SIZE = 4 * 2**20  # characters of one prediction, bytes of its line or page file (ours: ~20 KB)
MAX_FILE_BYTES = 256 * 2**20  # a JSON predictions file is read whole; larger ones are refused


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
        if image is not None and not isinstance(image, bytes):
            if not Path(image).is_file():  # a regular file: never a pipe or a device
                raise FileNotFoundError(f"item {self.key!r}: image {image} does not exist")
            image = Path(image).read_bytes()
        if image is None:
            raise FileNotFoundError(f"item {self.key!r} has no image")
        try:
            loaded = open_image(image)  # the pixel count checked from the header before decoding
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
    model: Any = None  # the VisionLanguageModel that generated (None when scoring given predictions)


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
class PredictionIssue:
    """A prediction not used as given: where it is (`file:line`), why (`reason`, a short name), what was
    done instead (`action`), and the item key when it is known."""

    location: str
    reason: str
    action: str = "skipped"
    detail: str = ""
    key: str | None = None


class Predictions(dict):
    """{key: prediction} read from a file, with the issues met while reading it."""

    def __init__(self, *args, issues: list[PredictionIssue] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.issues: list[PredictionIssue] = issues if issues is not None else []


@dataclass
class Benchmark:
    """Base: subclasses implement `items`, `score` and the prediction format (`write_predictions`,
    `read_predictions`); the defaults read and write one JSON object {key: prediction}.

    `tokenizers`: the reference tokenizers (`vlm.text_accounting`) that, with the model's own, count the
    text an image shows, for `chars_per_vision_token` and `compression_<tokenizer>`; `vision_tokens`:
    vision tokens per image of a model scored from its predictions (with a checkpoint: the model's)."""

    name: str = "benchmark"
    batch_size: int = 8
    max_new_tokens: int = 512
    limit: int | None = None  # items; None = all
    tokenizers: list[str] = field(default_factory=lambda: list(DEFAULT_REFERENCES))
    vision_tokens: int | None = None

    def vision_tokens_per_image(self, context: Context | None) -> int | None:
        """The model's vision tokens per image, else `vision_tokens`."""
        return (context.vision_tokens_per_image if context is not None else None) or self.vision_tokens

    def accounting(self, context: Context | None) -> TextAccounting:
        """Counts of text under the model's tokenizer (when there is a checkpoint) and `tokenizers`."""
        return TextAccounting(context.tokenizer if context is not None else None, self.tokenizers)

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

    def read_predictions(self, path: Path, items: list[Item]) -> Predictions:
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

    def read_predictions(self, path: Path, items: list[Item]) -> Predictions:
        path = prediction_path(path, self.predictions_file)
        issues: list[PredictionIssue] = []
        try:
            rows = list(read_json_members(path, "[", issues))
        except ValueError as error:
            raise ValueError(f"predictions={path}: expected {self.row_format} ({error})") from error
        texts = {}
        for location, row in rows:
            try:
                row_id, text = self.row_id(row), self.row_text(row)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                issues.append(
                    PredictionIssue(location, "not_a_row", detail=f"expected {self.row_format} ({error!r})")
                )
                continue
            problem = prediction_problem(text)
            if problem:
                issues.append(PredictionIssue(location, problem, key=str(row_id)))
                continue
            texts[row_id] = text
        found = {item.key: texts[self.item_id(item)] for item in items if self.item_id(item) in texts}
        return Predictions(found, issues=issues)


def read_json_predictions(path: Path) -> Predictions:
    """{key: prediction} from a JSON object, or from the `predictions.json` inside a directory."""
    path = prediction_path(path, "predictions.json")
    issues: list[PredictionIssue] = []
    predictions = Predictions(issues=issues)
    for location, (key, text) in read_json_members(path, "{", issues):
        problem = prediction_problem(text)
        if problem:
            issues.append(PredictionIssue(location, problem, key=key))
        else:
            predictions[key] = text
    return predictions


# -- reading untrusted prediction files ------------------------------------------------------------
_NOT_UNICODE = re.compile("[\ud800-\udfff]")  # lone surrogates, and undecodable bytes (surrogateescape)
_SPACE = re.compile(r"[ \t\r\n]*")
# where reading goes on after a member that does not parse: the next line that starts a row ("{" or "[")
# or a key ('"'); in a file without more lines, the next comma before one
_NEXT_LINE = {
    "[": re.compile(r"\n[ \t\r]*,?[ \t\r\n]*(?=[{\[])"),
    "{": re.compile(r'\n[ \t\r]*,?[ \t\r\n]*(?=")'),
}
_NEXT_COMMA = {"[": re.compile(r",[ \t\r\n]*(?=[{\[])"), "{": re.compile(r',[ \t\r\n]*(?=")')}
_DECODER = json.JSONDecoder()


def prediction_path(path: Path, name: str) -> Path:
    """`path`, or the file `name` inside it when it is a directory; FileNotFoundError when there is none."""
    path = Path(path) / name if Path(path).is_dir() else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions={path}: no such file")
    return path


def prediction_problem(text) -> str | None:
    """Why a prediction cannot be scored (a reason name), or None."""
    if not isinstance(text, str):
        return "not_a_string"
    if len(text) > MAX_PREDICTION_SIZE:
        return "too_long"
    if _NOT_UNICODE.search(text):
        return "invalid_unicode"
    return None


def read_text_capped(path: Path, max_bytes: int = MAX_FILE_BYTES) -> str:
    """A file's text (undecodable bytes kept as lone surrogates), refused when it is over `max_bytes`."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path}: {size} bytes, over the {max_bytes} bytes read whole")
    return path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def read_json_members(
    path: Path, opener: str, issues: list[PredictionIssue], max_bytes: int = MAX_FILE_BYTES
) -> Iterator[tuple[str, object]]:
    """The rows of the JSON list (`opener` "[") or the (key, value) members of the JSON object ("{") in
    `path`, each with its location `file:line`. A member that does not parse is added to `issues` and
    skipped; reading goes on at the next line that starts a row or a key (else the next comma before one)."""
    text = read_text_capped(path, max_bytes)
    closer = "]" if opener == "[" else "}"
    pos = _SPACE.match(text).end()
    if text[pos : pos + 1] != opener:
        kind = "list [...]" if opener == "[" else "object {...}"
        raise ValueError(f"{path}: expected a JSON {kind}")
    pos = _SPACE.match(text, pos + 1).end()
    line, counted = 1, 0
    while pos < len(text) and text[pos] != closer:
        line, counted = line + text.count("\n", counted, pos), pos
        location = f"{path}:{line}"
        try:
            member, end = _json_member(text, pos, opener == "{")
            end = _SPACE.match(text, end).end()
            if text[end : end + 1] not in (",", closer):
                raise ValueError(f"expected ',' or '{closer}' at character {end}")
        except RecursionError:
            issues.append(PredictionIssue(location, "nested_too_deep"))
        except ValueError as error:
            issues.append(PredictionIssue(location, "invalid_json", detail=str(error)[:200]))
        else:
            yield location, member
            pos = _SPACE.match(text, end + 1).end() if text[end] == "," else end
            continue
        following = _NEXT_LINE[opener].search(text, pos + 1) or _NEXT_COMMA[opener].search(text, pos + 1)
        pos = following.end() if following else len(text)


def _json_member(text: str, pos: int, keyed: bool) -> tuple[object, int]:
    if not keyed:
        return _DECODER.raw_decode(text, pos)
    key, end = _DECODER.raw_decode(text, pos)
    colon = _SPACE.match(text, end).end()
    if not isinstance(key, str) or text[colon : colon + 1] != ":":
        raise ValueError(f'expected "key": value at character {pos}')
    value, end = _DECODER.raw_decode(text, _SPACE.match(text, colon + 1).end())
    return (key, value), end


def read_json_lines(
    path: Path, issues: list[PredictionIssue], max_line_bytes: int = MAX_PREDICTION_SIZE
) -> Iterator[tuple[str, object]]:
    """The rows of a JSON-lines file, each with its location `file:line`, read line by line (a line over
    `max_line_bytes` is not kept in memory); a line that does not parse is added to `issues` and skipped."""
    with open(path, "rb") as f:
        number = 0
        while line := f.readline(max_line_bytes + 1):
            number += 1
            location = f"{path}:{number}"
            if len(line) > max_line_bytes:
                while line and not line.endswith(b"\n"):
                    line = f.readline(max_line_bytes)
                issues.append(PredictionIssue(location, "too_long"))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                issues.append(PredictionIssue(location, "invalid_unicode"))
            except RecursionError:
                issues.append(PredictionIssue(location, "nested_too_deep"))
            except ValueError as error:
                issues.append(PredictionIssue(location, "invalid_json", detail=str(error)[:200]))
            else:
                yield location, row


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
    """Items from shards written by `python -m vlm.app.prepare` (key, image bytes, prompt, answers,
    meta); `prompt`, when given, replaces the shard's and may use {question} from the meta."""
    from vlm.data.processing import SkipCounter, image_members, load_record
    from vlm.data.shards import expand_urls
    from vlm.data.skips import Skip
    from vlm.data.tar_reading import read_shards

    items = []
    for raw in read_shards(expand_urls(urls)):
        if limit is not None and len(items) >= limit:
            break
        key = raw.get("__key__", "?")
        try:
            record = load_record(raw.get("json"), key)
            meta = {"task": record.get("task"), **(record.get("meta") or {})}
            text = (
                record["prompt"] if prompt is None else prompt.replace("{question}", meta.get("question", ""))
            )
            images = [data for _, data in image_members(raw)]
            image = images[0] if len(images) == 1 else images or None
            items.append(Item(key, image, text, list(record.get("answers") or []), meta))
        except (KeyError, ValueError, TypeError) as error:  # one bad sample is skipped and named
            log.warning(
                "skipped shard sample %r of %s: not a prepared sample (%s)", key, raw["__url__"], error
            )
            SkipCounter.add(
                error if isinstance(error, Skip) else Skip("malformed_record", str(error), key=key)
            )
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


def curve_plot(
    rows: list[dict] | dict[str, list[dict]],
    x: str,
    ys: tuple[str, ...],
    xlabel: str,
    references: dict[str, list[tuple[float, float]]] | None = None,
    xscale: str = "linear",
):
    """A plot maker: scores (0..1) in `ys` against `x`, one line each (e.g. precision vs compression),
    and each of `references` (label -> (x, score) points, e.g. a published model's) as grey markers.
    `rows` may be {series label: rows} (e.g. one per arm): a colour per series, a line style per score
    (solid, dashed, ...). Rows holding `<y>_low` and `<y>_high` get them as error bars; `xscale` is
    matplotlib's ("log": ratios that double from point to point spread evenly)."""
    series = rows if isinstance(rows, dict) else {"": rows}

    def make(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4) if len(series) == 1 else (9, 5))
        for index, (name, points) in enumerate(series.items()):
            colour = f"C{index % 10}" if len(series) > 1 else None
            for y, marker, style in zip(ys, "o^sDv", ("-", "--", ":", "-."), strict=False):
                error = None
                if all(f"{y}_low" in row and f"{y}_high" in row for row in points):
                    error = [
                        [row[y] - row[f"{y}_low"] for row in points],
                        [row[f"{y}_high"] - row[y] for row in points],
                    ]
                label = f"{name}: {y}" if name else y
                ax.errorbar(
                    [row[x] for row in points],
                    [row[y] for row in points],
                    yerr=error,
                    marker=marker,
                    linestyle=style,
                    color=colour,
                    capsize=2,
                    label=label,
                )
        for (label, points), marker in zip((references or {}).items(), "xP*+", strict=False):
            xs, scores = zip(*points, strict=True)
            ax.scatter(xs, scores, marker=marker, color="grey", label=label)
        ax.set_xscale(xscale)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("score")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if len(series) == 1:
            ax.legend()
        else:  # one entry per arm and score: beside the axes, not over the curves
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    return make


def text_metrics(accounting: TextAccounting, counts: list[dict], vision_tokens: float | None) -> dict:
    """The mean text counts (`mean_chars`, `mean_bytes`, `mean_tokens_<tokenizer>`) of `counts` (rows with
    `accounting.count`'s keys) and, given the vision tokens per item, the ratios of those means to them
    (`chars_per_vision_token`, `compression_<tokenizer>`)."""
    means = {key: mean(row[key] for row in counts) for key in accounting.count_keys}
    ratios = accounting.ratios(means, vision_tokens) if vision_tokens else {}
    return {f"mean_{key}": value for key, value in means.items()} | ratios


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
