"""Built-in benchmarks on rendered text, with exact ground truth and no downloads.

- `benchmark=synthetic`: read back the held-out test split of the run's own data; CER, WER, exact
  match, the text per sample (characters, bytes, tokens), vision tokens, characters per vision token
  and compression under each tokenizer (`vlm.text_accounting`).
- `benchmark=synthetic_compression`: text of a sweep of lengths rendered into the model's fixed input
  size (the font shrinks to fit), giving precision versus compression under each tokenizer for any
  checkpoint.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from vlm import corpus
from vlm.data.render import RenderStyle, TextDoesNotFit, find_font, render
from vlm.eval.benchmarks.base import (
    Benchmark,
    Context,
    Item,
    PredictionIssue,
    Predictions,
    Result,
    curve_plot,
    empty_for_missing,
    mean,
    prediction_path,
    prediction_problem,
    read_json_lines,
    shard_items,
    text_metrics,
)
from vlm.eval.ocr import ocr_scores
from vlm.metrics import cer, corpus_cer, corpus_wer, exact_match
from vlm.text_accounting import compression_label


@dataclass
class SyntheticBenchmark(Benchmark):
    """Generates on a split of the run's own data and scores the text."""

    name: str = "synthetic"
    split: str = "test"
    batch_size: int = 64
    max_new_tokens: int = 96

    def items(self, context: Context | None = None) -> list[Item]:
        if context is None or context.datamodule is None:
            raise ValueError("benchmark=synthetic reads the run's own test split: give ckpt_path=...")
        context.datamodule.prepare_data()
        return shard_items(context.datamodule.shards(self.split), self.limit)

    def score(self, items: list[Item], predictions: dict[str, str], context: Context) -> Result:
        predictions, notes = empty_for_missing(items, predictions, "samples")
        texts = [predictions[item.key] for item in items]
        references = [item.answers[0] for item in items]
        accounting = self.accounting(context)
        counts = [accounting.count(reference) for reference in references]
        samples = [
            {"key": item.key, "prediction": text, "answers": item.answers, "cer": cer(text, reference)}
            | count
            for item, text, reference, count in zip(items, texts, references, counts, strict=True)
        ]
        metrics = {
            "split": self.split,
            "samples": len(items),
            "cer": corpus_cer(texts, references),
            "wer": corpus_wer(texts, references),
            "exact_match": exact_match(texts, references),
            "vision_tokens_per_image": self.vision_tokens_per_image(context),
        }
        metrics |= text_metrics(accounting, counts, metrics["vision_tokens_per_image"])
        return Result(metrics, samples, notes=notes)


# DeepSeek-OCR on Fox's English pages (arXiv 2510.18234, Table 2): (compression, precision) per text-length
# bucket; compression = text tokens of its own ~129k-id BPE / vision tokens (../shared/reference/compression.md)
DEEPSEEK_OCR_FOX = {
    64: [
        (10.5, 0.965),
        (11.8, 0.938),
        (13.2, 0.838),
        (15.1, 0.859),
        (16.5, 0.793),
        (17.7, 0.764),
        (19.7, 0.591),
    ],
    100: [
        (6.7, 0.985),
        (7.5, 0.973),
        (8.5, 0.968),
        (9.7, 0.968),
        (10.6, 0.915),
        (11.3, 0.898),
        (12.6, 0.871),
    ],
}
FOX_REFERENCE = {
    f"DeepSeek-OCR, Fox, {tokens} vision tokens (its own BPE)": points
    for tokens, points in DEEPSEEK_OCR_FOX.items()
}


@dataclass
class SyntheticCompression(Benchmark):
    """Precision versus compression on rendered text with exact ground truth.

    For each text length (characters: `lengths`, else each of `chars_per_vision_token` times the vision
    tokens per image), `samples_per_length` snippets of the corpus's test split are rendered into an image
    of `image_size` (default: the checkpoint's encoder input), in the largest of `font_sizes` at which the
    snippet fits. Per length: the ground truth's characters per vision token and `compression_<tokenizer>`
    (its tokens / vision tokens per image) for the model's tokenizer and each of `tokenizers`, with one
    plot per tokenizer, DeepSeek-OCR's Fox points drawn on each for reference (their x is its own
    tokenizer's ratio). Lengths that fit at no font size are reported.
    """

    name: str = "synthetic_compression"
    lengths: list[int] | None = None
    chars_per_vision_token: list[float] | None = field(default_factory=lambda: [2, 4, 8, 16, 32])
    samples_per_length: int = 32
    image_size: list[int] | None = None  # (height, width); None = the encoder's input size
    font: str = "DejaVuSans"
    font_sizes: list[int] = field(default_factory=lambda: [15, 14, 13, 12, 11, 10, 9, 8])
    prompt: str = "<image>\nRead the text."
    seed: int = 0
    batch_size: int = 64
    max_new_tokens: int = 128

    def _size(self, context: Context | None) -> tuple[int, int]:
        size = self.image_size or (context.image_size if context is not None else None)
        if size is None:
            raise ValueError(
                "benchmark=synthetic_compression needs benchmark.image_size=[H,W] without a checkpoint"
            )
        return tuple(size)

    def target_lengths(self, context: Context | None) -> dict[int, float | None]:
        """Length in characters -> the characters per vision token it was chosen for (None: `lengths`)."""
        if self.lengths:
            return dict.fromkeys(self.lengths)
        if not self.chars_per_vision_token:
            raise ValueError(
                "benchmark=synthetic_compression needs benchmark.lengths or chars_per_vision_token"
            )
        vision = self.vision_tokens_per_image(context)
        if not vision:
            raise ValueError(
                "benchmark.chars_per_vision_token needs the vision tokens per image: a checkpoint, or "
                "benchmark.vision_tokens=N (or give benchmark.lengths)"
            )
        return {max(1, round(target * vision)): target for target in self.chars_per_vision_token}

    def items(self, context: Context | None = None) -> list[Item]:
        height, width = self._size(context)
        font = self.font if find_font(self.font) else None
        rng = random.Random(self.seed)
        self.unfit: list[int] = []
        items = []
        targets = self.target_lengths(context)
        self.too_long: list[int] = []
        for length, target in targets.items():
            try:
                texts = corpus.snippets(
                    "test", self.samples_per_length, max(1, length - 8), length, self.seed
                )
            except corpus.NotEnoughText:
                self.too_long.append(length)
                continue
            rendered = 0
            for i, text in enumerate(texts):
                for size in sorted(self.font_sizes, reverse=True):
                    style = RenderStyle(font, size, jitter=(rng.randint(0, 2), rng.randint(0, 2)))
                    try:
                        image = render(text, (height, width), style)
                    except TextDoesNotFit:
                        continue
                    meta = {"task": "ocr", "length": length, "font_size": size, "chars": len(text)}
                    if target is not None:
                        meta["target_chars_per_vision_token"] = target
                    items.append(Item(f"len{length:04d}-{i:04d}", image, self.prompt, [text], meta))
                    rendered += 1
                    break
            if not rendered:
                self.unfit.append(length)
        return self.limited(items)

    def write_predictions(self, items: list[Item], predictions: dict[str, str], out_dir: Path) -> Path:
        path = out_dir / "predictions.jsonl"
        with open(path, "w") as f:
            for item in items:
                if item.key in predictions:
                    f.write(json.dumps({"key": item.key, "prediction": predictions[item.key]}) + "\n")
        return path

    def read_predictions(self, path: Path, items: list[Item]) -> Predictions:
        predictions = Predictions()
        for location, row in read_json_lines(prediction_path(path, "predictions.jsonl"), predictions.issues):
            if not isinstance(row, dict) or not isinstance(row.get("key"), str) or "prediction" not in row:
                predictions.issues.append(
                    PredictionIssue(location, "not_a_row", detail="expected {key, prediction}")
                )
                continue
            problem = prediction_problem(row["prediction"])
            if problem:
                predictions.issues.append(PredictionIssue(location, problem, key=row["key"]))
            else:
                predictions[row["key"]] = row["prediction"]
        return predictions

    def score(self, items: list[Item], predictions: dict[str, str], context: Context) -> Result:
        predictions, notes = empty_for_missing(items, predictions, "samples")
        if getattr(self, "unfit", None):
            notes.append(f"lengths {self.unfit} fit the image at no font size in {self.font_sizes}")
        if getattr(self, "too_long", None):
            notes.append(f"lengths {self.too_long}: the corpus's test split has too few snippets that long")
        accounting = self.accounting(context)
        vision = self.vision_tokens_per_image(context)
        samples = []
        for item in items:
            scores = ocr_scores(predictions[item.key], item.answers[0], "en")
            row = {
                "key": item.key,
                **item.meta,
                "prediction": predictions[item.key],
                "answer": item.answers[0],
            }
            row |= {"precision": scores["precision"], "one_minus_ned": scores["one_minus_ned"]}
            row["cer"] = cer(predictions[item.key], item.answers[0])
            samples.append(row | accounting.count(item.answers[0]))
        curve = []
        for length in dict.fromkeys(item.meta["length"] for item in items):
            rows = [r for r in samples if r["length"] == length]
            point = {
                "length": length,
                **{k: rows[0][k] for k in ("target_chars_per_vision_token",) if k in rows[0]},
                "samples": len(rows),
                "font_size": mean(r["font_size"] for r in rows),
                "precision": mean(r["precision"] for r in rows),
                "one_minus_ned": mean(r["one_minus_ned"] for r in rows),
                "cer": mean(r["cer"] for r in rows),
            }
            point |= {key: mean(r[key] for r in rows) for key in accounting.count_keys}
            if vision:
                point |= accounting.ratios(point, vision)
            curve.append(point)
        metrics = {
            "samples": len(items),
            "vision_tokens_per_image": vision,
            "precision": mean(r["precision"] for r in samples),
            "one_minus_ned": mean(r["one_minus_ned"] for r in samples),
            "cer": mean(r["cer"] for r in samples),
        }
        scores = ("precision", "one_minus_ned")
        if vision:
            plots = {
                f"precision_vs_compression_{name}": curve_plot(
                    curve, f"compression_{name}", scores, compression_label(name), FOX_REFERENCE
                )
                for name in accounting.names
            }
        else:
            plots = {"precision_vs_length": curve_plot(curve, "length", scores, "characters")}
        return Result(metrics, samples, {"curve": curve}, plots, notes)
