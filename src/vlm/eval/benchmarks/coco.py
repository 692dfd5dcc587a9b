"""COCO captions: BLEU-1..4, ROUGE-L and CIDEr-D without Java (see `vlm.eval.captions`).

Items come from shards written by `python -m vlm.data.prepare coco` (key `coco-<image id>`, all the
image's captions as references). Prediction format: the COCO results JSON,
[{"image_id": int, "caption": str}, ...].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlm.eval.benchmarks.base import (
    Benchmark,
    Context,
    Item,
    Result,
    bar_plot,
    empty_for_missing,
    shard_items,
)
from vlm.eval.captions import caption_scores


@dataclass
class CocoCaptions(Benchmark):
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

    def write_predictions(self, items: list[Item], predictions: dict[str, str], out_dir: Path) -> Path:
        path = out_dir / "captions_results.json"
        rows = [
            {"image_id": item.meta["image_id"], "caption": predictions[item.key]}
            for item in items
            if item.key in predictions
        ]
        path.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
        return path

    def read_predictions(self, path: Path, items: list[Item]) -> dict[str, str]:
        path = path / "captions_results.json" if path.is_dir() else path
        try:
            rows = json.loads(path.read_text())
            captions = {int(row["image_id"]): str(row["caption"]) for row in rows}
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"predictions={path}: expected the COCO results JSON [{{image_id, caption}}, ...] ({error})"
            ) from error
        return {
            item.key: captions[int(item.meta["image_id"])]
            for item in items
            if int(item.meta["image_id"]) in captions
        }

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
