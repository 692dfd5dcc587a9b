"""DocVQA ANLS (Average Normalized Levenshtein Similarity) and the test-submission format.

Protocol (Biten et al., "Scene Text VQA", ICCV 2019; DocVQA, Mathew et al., WACV 2021) as implemented by
the official RRC/DocVQA evaluation script (``evaluate_method`` in the ``rrc.cvc.uab.es`` DocVQA task
script; lmms-eval's ``anls`` is a copy of it). For one question with gold answers ``a_1..a_M`` and the
model answer ``o``:

1. Normalise both strings: ``" ".join(s.strip().lower().split())`` -- lowercase, strip, and collapse every
   run of whitespace (spaces, tabs, newlines) into one space. No punctuation or article removal.
2. ``NL_j = Levenshtein(norm(a_j), norm(o)) / max(len(a_j.upper()), len(o.upper()))``; ``NL_j = 0`` when
   that length is 0. Note the official script divides by the lengths of the *raw* strings (before
   whitespace normalisation; ``.upper()`` only matters for characters such as ``"ß"``), not of the
   normalised ones. We reproduce that, so ``"a  b"`` (two spaces) vs ``"a c"`` scores 1 - 1/4 rather
   than 1 - 1/3.
3. Question score ``q = 1 - min_j NL_j``; if ``q < threshold`` (0.5) then ``q = 0``. Taking the max of the
   thresholded per-answer similarities is the same thing, because the threshold is monotone.
4. ANLS = mean of ``q`` over questions.

Boundary: the paper writes ``1 - NL if NL < tau else 0``, which gives 0 at exactly ``NL = 0.5``; the
official script (``if 1 - NL < 0.5: 0``) keeps 0.5 there. We follow the script.

Empty strings: both empty -> length 0 -> NL 0 -> score 1 (the official script does the same); an empty
prediction against a non-empty answer has NL 1 -> score 0. Because of the raw-length denominator of
step 2, a whitespace-only prediction is *not* the same as an empty one (``"   "`` vs ``"a"``: distance 1,
length 3, score 2/3); strip model outputs before scoring if that matters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rapidfuzz.distance import Levenshtein

__all__ = ["anls", "anls_score", "docvqa_submission", "normalize_answer", "normalized_levenshtein"]


def normalize_answer(text: str) -> str:
    """Lowercase, strip and collapse whitespace runs, exactly as the official DocVQA script does."""
    return " ".join(text.strip().lower().split())


def normalized_levenshtein(prediction: str, answer: str) -> float:
    """NL of the official script: distance of the normalised strings / max length of the raw strings."""
    dist = Levenshtein.distance(normalize_answer(answer), normalize_answer(prediction))
    length = max(len(answer.upper()), len(prediction.upper()))
    return 0.0 if length == 0 else dist / length


def anls_score(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one question: ``1 - min NL`` over the gold answers, set to 0 when below ``threshold``."""
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, not a single string")
    if len(answers) == 0:
        raise ValueError("a question needs at least one gold answer")
    score = 1.0 - min(normalized_levenshtein(prediction, a) for a in answers)
    return 0.0 if score < threshold else score


def anls(predictions: Sequence[str], gold: Sequence[Sequence[str]], threshold: float = 0.5) -> float:
    """Mean ANLS over questions (``predictions[i]`` answers the question whose gold list is ``gold[i]``)."""
    if len(predictions) != len(gold):
        raise ValueError(f"{len(predictions)} predictions for {len(gold)} questions")
    if not predictions:
        raise ValueError("ANLS of an empty set of questions is undefined")
    return sum(anls_score(p, g, threshold) for p, g in zip(predictions, gold, strict=True)) / len(gold)


def docvqa_submission(
    records: Iterable[Mapping[str, Any]], path: str | Path | None = None
) -> list[dict[str, int | str]]:
    """Official DocVQA test-submission format: ``[{"questionId": int, "answer": str}, ...]``.

    Each record needs a question id under ``questionId`` (DocVQA's own key) or ``question_id``, and the
    model's answer under ``answer`` or ``prediction``. Duplicate ids are rejected (the RRC server maps
    each question id to one submitted answer). If ``path`` is given the list is also written there as
    JSON (UTF-8, non-ASCII kept).
    """
    out: list[dict[str, int | str]] = []
    seen: set[int] = set()
    for rec in records:
        qid_raw = rec["questionId"] if "questionId" in rec else rec["question_id"]
        answer = rec["answer"] if "answer" in rec else rec["prediction"]
        qid = int(qid_raw)
        if qid in seen:
            raise ValueError(f"duplicate questionId {qid}")
        seen.add(qid)
        out.append({"questionId": qid, "answer": str(answer)})
    if path is not None:
        Path(path).write_text(json.dumps(out, ensure_ascii=False, indent=1), encoding="utf-8")
    return out
