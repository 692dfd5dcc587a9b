"""COCO captions: BLEU-1..4, ROUGE-L and CIDEr-D without Java (see `vlm.eval.captions`).

Items come from shards written by `python -m vlm.app.prepare coco` (key `coco-<image id>`, all the
image's captions as references). Prediction format: the COCO results JSON,
[{"image_id": int, "caption": str}, ...].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlm.eval.benchmarks.base import (
    Context,
    Item,
    JsonRowsBenchmark,
    Result,
    bar_plot,
    empty_for_missing,
    shard_items,
)
from vlm.eval.captions import caption_scores


@dataclass
class CocoCaptions(JsonRowsBenchmark):
    predictions_file: ClassVar[str] = "captions_results.json"
    row_format: ClassVar[str] = "the COCO results JSON [{image_id, caption}, ...]"
    name: str = "coco"
    urls: str | list[str] = "data/coco/val/*.tar"  # shards of one split (Karpathy test or val2017)
    prompt: str | None = None  # None = the shards' own ("<image>\nDescribe the image.")
    batch_size: int = 32
    max_new_tokens: int = 32

    def items(self, context: Context | None = None) -> list[Item]:
        items = shard_items(self.urls, self.limit, self.prompt)
        for item in items:
            if item.meta.get("image_id") is None or not item.answers:
                raise ValueError(f"{item.key}: no image_id or no captions (not a prepared COCO shard?)")
        return items

    def to_rows(self, items: list[Item], predictions: dict[str, str]) -> list[dict]:
        return [{"image_id": item.meta["image_id"], "caption": predictions[item.key]} for item in items]

    def row_id(self, row: dict) -> int:
        return int(row["image_id"])

    def row_text(self, row: dict) -> str:
        return row["caption"]

    def item_id(self, item: Item) -> int:
        return int(item.meta["image_id"])

    def score(self, items: list[Item], predictions: dict[str, str], context: Context) -> Result:
        predictions, notes = empty_for_missing(items, predictions, "images")
        candidates = {item.key: predictions[item.key] for item in items}
        references = {item.key: item.answers for item in items}
        scores = caption_scores(candidates, references)
        numbers = {k: v for k, v in scores.items() if isinstance(v, float)}
        notes.append(f"tokenisation: {scores['tokenization']}")
        samples = [
            {
                "key": item.key,
                "image_id": item.meta["image_id"],
                "prediction": candidates[item.key],
                "references": item.answers,
            }
            for item in items
        ]
        return Result(
            {"images": len(items), **numbers},
            samples,
            plots={"scores": bar_plot(numbers, "score")},
            notes=notes,
        )
