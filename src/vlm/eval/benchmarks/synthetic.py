"""The built-in benchmark: read back held-out rendered text; CER, WER, exact match, compression ratio."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlm.eval.metrics import cer, corpus_cer, corpus_wer, exact_match


@dataclass
class SyntheticBenchmark:
    """Generates on a split of the run's own data and scores the text."""

    name: str = "synthetic"
    split: str = "test"
    limit: int | None = None  # samples; None = the whole split
    batch_size: int = 64
    max_new_tokens: int = 96

    def dataloader(self, datamodule):
        datamodule.eval_batch_size = self.batch_size
        return datamodule.eval_dataloader(self.split, self.limit)

    def score(self, records: list[dict], tokenizer, vision_tokens_per_image: int) -> dict:
        if not records:
            raise ValueError("no predictions to score: the evaluation split is empty")
        predictions = [r["prediction"] for r in records]
        references = [r["answers"][0] for r in records]
        text_tokens = [len(tokenizer.encode(ref)) for ref in references]
        mean_text_tokens = sum(text_tokens) / len(text_tokens)
        for record, tokens in zip(records, text_tokens, strict=True):
            record["text_tokens"] = tokens
            record["cer"] = cer(record["prediction"], record["answers"][0])
        return {
            "benchmark": self.name,
            "split": self.split,
            "samples": len(records),
            "cer": corpus_cer(predictions, references),
            "wer": corpus_wer(predictions, references),
            "exact_match": exact_match(predictions, references),
            "mean_text_tokens": mean_text_tokens,
            "vision_tokens_per_image": vision_tokens_per_image,
            "compression_ratio": mean_text_tokens / vision_tokens_per_image,
        }

    def write(self, out_dir: Path, records: list[dict], metrics: dict) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "predictions.jsonl", "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))


def format_table(metrics: dict) -> str:
    """A two-column text table of the metrics."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}} | {v}" for k, v in rows), line])
