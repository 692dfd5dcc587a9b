"""Fox page OCR (English and Chinese) and DeepSeek-OCR's compression study.

Data (the Fox benchmark release, `focus_benchmark_test/`): `en_page_ocr.json` and `cn_page_ocr.json`,
entries {"image": "en_1.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": ground truth}]}, images in `en_pdf_png/` and `cn_pdf_png/`.

Metrics per page (`vlm.eval.ocr`; words by `str.split()`, or jieba when either text has Chinese, as
the official script decides per page): word precision in both conventions, recall, F1, normalised edit
distance and 1 - NED, BLEU; means over pages, per language. The compression study, once per tokenizer
(our LLM's and each of `tokenizers`, `vlm.text_accounting`), bins pages by their ground-truth tokens
under it (bins of `bin_size`) and divides by the vision tokens per page from the model config or
`vision_tokens`: `compression_<tokenizer>` and `chars_per_vision_token` per bin (DeepSeek-OCR, Table
2: English pages of 600-1300 tokens of its own tokenizer, 64 and 100 vision tokens).

Prediction format: what the official `eval_tools/eval_ocr_test.py` reads, a JSON list of
{"image", "lang", "label": ground truth, "answer": prediction}; `fox_predictions.json` in a directory.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from vlm.eval.benchmarks.base import (
    Context,
    Item,
    JsonRowsBenchmark,
    Result,
    curve_plot,
    empty_for_missing,
    mean,
    text_metrics,
)
from vlm.eval.ocr import ocr_scores
from vlm.text_accounting import TextAccounting, compression_label

SCORES_VS_COMPRESSION = ("precision", "precision_fox_official", "one_minus_ned")
SCORES = (
    "precision",
    "recall",
    "f1",
    "precision_fox_official",
    "recall_fox_official",
    "edit_distance",
    "one_minus_ned",
    "bleu",
    "bleu_fox_official",
)


@dataclass
class Fox(JsonRowsBenchmark):
    predictions_file: ClassVar[str] = "fox_predictions.json"
    row_format: ClassVar[str] = "[{image, lang, label, answer}, ...]"
    name: str = "fox"
    data_dir: str = "data/fox/focus_benchmark_test"
    languages: list[str] = field(default_factory=lambda: ["en", "cn"])
    prompt: str | None = None  # None = each entry's own request
    bin_size: int = 100  # tokens per bin of the compression study
    compression_languages: list[str] = field(default_factory=lambda: ["en"])  # as DeepSeek-OCR
    batch_size: int = 4
    max_new_tokens: int = 2048

    def items(self, context: Context | None = None) -> list[Item]:
        root = Path(self.data_dir)
        items = []
        for lang in self.languages:
            path = root / f"{lang}_page_ocr.json"
            if not path.is_file():
                raise FileNotFoundError(f"benchmark=fox: {path} does not exist (benchmark.data_dir={root})")
            for position, entry in enumerate(json.loads(path.read_text())):
                try:
                    turns = {turn["from"]: turn["value"] for turn in entry["conversations"]}
                    image, request, truth = entry["image"], turns["human"], turns["gpt"]
                except (KeyError, TypeError) as error:
                    raise ValueError(f"{path} entry {position}: not a Fox page entry ({error!r})") from error
                key = f"{lang}/{Path(image).stem}"
                prompt = self.prompt if self.prompt is not None else request
                meta = {"lang": lang, "image": image}
                items.append(Item(key, root / f"{lang}_pdf_png" / image, prompt, [truth], meta))
        return self.limited(items)

    def to_rows(self, items: list[Item], predictions: dict[str, str]) -> list[dict]:
        return [{**item.meta, "label": item.answers[0], "answer": predictions[item.key]} for item in items]

    def row_id(self, row: dict) -> str:
        return f"{row['lang']}/{Path(row['image']).stem}"  # = the item's key

    def row_text(self, row: dict) -> str:
        return row["answer"]

    def score(self, items: list[Item], predictions: dict[str, str], context: Context) -> Result:
        predictions, notes = empty_for_missing(items, predictions, "pages")
        accounting = self.accounting(context)
        samples = []
        for item in items:
            row = {"key": item.key, "lang": item.meta["lang"]}
            row |= {
                k: v for k, v in ocr_scores(predictions[item.key], item.answers[0]).items() if k in SCORES
            }
            row |= accounting.count(item.answers[0])
            samples.append(row | {"prediction": predictions[item.key], "answer": item.answers[0]})
        metrics: dict = {"pages": len(items)} | {k: mean(r[k] for r in samples) for k in SCORES}
        by_lang = defaultdict(list)
        for row in samples:
            by_lang[row["lang"]].append(row)
        tables = {
            "by_language": [
                {"lang": lang, "pages": len(rows)} | {k: mean(r[k] for r in rows) for k in SCORES}
                for lang, rows in by_lang.items()
            ]
        }
        vision = self.vision_tokens_per_image(context)
        plots = {}
        if vision is None:
            notes.append(
                "no vision-token count (no checkpoint and no benchmark.vision_tokens): compression study skipped"
            )
        else:
            metrics["vision_tokens_per_page"] = vision
            study = [r for r in samples if r["lang"] in self.compression_languages]
            metrics |= text_metrics(accounting, study, vision)
            for name in accounting.names:
                table = compression_table(study, accounting, name, vision, self.bin_size)
                tables[f"compression_{name}"] = table
                plots[f"precision_vs_compression_{name}"] = curve_plot(
                    table, f"compression_{name}", SCORES_VS_COMPRESSION, compression_label(name)
                )
        return Result(metrics, samples, tables, plots, notes)


def compression_table(
    rows: list[dict], accounting: TextAccounting, name: str, vision_tokens: int, bin_size: int
) -> list[dict]:
    """Pages binned by their ground truth's tokens under tokenizer `name`: its characters per vision
    token, `compression_<name>`, precision (both conventions) and 1 - NED per bin."""
    tokens_key = f"tokens_{name}"
    bins = defaultdict(list)
    for row in rows:
        bins[row[tokens_key] // bin_size * bin_size].append(row)
    table = []
    for start in sorted(bins):
        members = bins[start]
        ratios = accounting.ratios(
            {k: mean(r[k] for r in members) for k in accounting.count_keys}, vision_tokens
        )
        table.append(
            {
                tokens_key: f"{start}-{start + bin_size}",
                "pages": len(members),
                "vision_tokens": vision_tokens,
                "chars_per_vision_token": ratios["chars_per_vision_token"],
                f"compression_{name}": ratios[f"compression_{name}"],
                "precision": mean(r["precision"] for r in members),
                "precision_fox_official": mean(r["precision_fox_official"] for r in members),
                "one_minus_ned": mean(r["one_minus_ned"] for r in members),
            }
        )
    return table
