"""Text metrics shared by benchmarks."""

from __future__ import annotations

from torchmetrics.functional.text import char_error_rate, word_error_rate


def cer(prediction: str, reference: str) -> float:
    """Character error rate of one prediction (edit distance / reference length)."""
    return float(char_error_rate(prediction, reference))


def corpus_cer(predictions: list[str], references: list[str]) -> float:
    """Total character edits over total reference characters."""
    return float(char_error_rate(predictions, references))


def corpus_wer(predictions: list[str], references: list[str]) -> float:
    return float(word_error_rate(predictions, references))


def exact_match(predictions: list[str], references: list[str]) -> float:
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / max(1, len(references))
