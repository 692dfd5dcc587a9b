"""Fox page-OCR metrics (``ucaslcl/Fox``, ``eval_tools/eval_ocr_test.py``), both precision conventions.

What the official script computes per page (``cal_per_metrics(predict_root_, pred, gt)``):

* words: ``jieba.lcut(text)`` if either string contains a character in ``[\\u4e00-\\u9fa5]``, else
  ``text.split()``. jieba keeps whitespace runs (``" "``, ``"\\n"``) as tokens; we keep that too.
* ``bleu = nltk.translate.bleu([reference], hypothesis)`` -- nltk's ``sentence_bleu`` with default
  settings: weights (0.25, 0.25, 0.25, 0.25), no smoothing (``SmoothingFunction().method0``), no
  auto-reweighting. Re-implemented in :func:`nltk_sentence_bleu` (nltk is not a dependency here).
* ``precision/recall/f_measure`` of ``nltk.metrics`` over the two word **sets** (duplicates collapse).
* ``edit_dist = nltk.edit_distance(pred, gt) / max(len(pred), len(gt))`` on the raw strings
  (characters, unit costs, no transpositions = Levenshtein).
* ``meteor`` (nltk, needs the WordNet corpus download) -- omitted here: it cannot run without that data
  file and its synonym stage depends on the WordNet version.

The argument swap: the script calls ``cal_per_metrics(path, ann["label"], ann["answer"])`` where
``label`` is the ground truth and ``answer`` the model output (Fox README), into parameters named
``(pred, gt)``. Hence inside it the model output is nltk's *reference* and the ground truth its
*test*/*hypothesis*:

* its ``precision`` = ``|GT ∩ pred| / |GT|`` (what is normally called recall) -> ``precision_fox_official``;
* its ``recall`` = ``|GT ∩ pred| / |pred|`` -> ``recall_fox_official``;
* its ``bleu`` scores the ground truth as the hypothesis against the prediction -> ``bleu_fox_official``;
* F1 and the edit distance are symmetric and unaffected.

:func:`ocr_scores` reports the standard convention (``precision``, ``recall``, ``bleu``: prediction
scored against the ground truth) and the official numbers (``*_fox_official``) side by side.

Empty inputs (the official script divides by zero or adds ``None`` there): edit distance of two empty
strings is 0; set precision with an empty prediction set (recall with an empty GT set) is 0, unless both
sets are empty, where precision = recall = F1 = 1; BLEU follows nltk (an empty hypothesis scores 0).
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from rapidfuzz.distance import Levenshtein

__all__ = [
    "contains_chinese",
    "corpus_ocr_scores",
    "nltk_sentence_bleu",
    "normalized_edit_distance",
    "ocr_scores",
    "words",
]

Lang = Literal["en", "zh", "auto"]

_CHINESE = re.compile(r"[\u4e00-\u9fa5]")


def contains_chinese(text: str) -> bool:
    """The official script's language test: any character in ``[\\u4e00-\\u9fa5]``."""
    return _CHINESE.search(text) is not None


def _jieba_lcut(text: str) -> list[str]:
    import jieba  # lazy: ~0.5 s dictionary load, only needed for Chinese pages

    jieba.setLogLevel(logging.WARNING)
    return jieba.lcut(text)


def words(text: str, lang: Lang = "en") -> list[str]:
    """Word list as the official Fox script builds it.

    ``"en"``: ``str.split()``. ``"zh"``: ``jieba.lcut`` (default accurate mode with HMM; whitespace runs
    are kept as tokens, as in the official script). ``"auto"``: ``"zh"`` if ``text`` contains a CJK
    character, else ``"en"`` (the official script decides once per page, on both strings: see
    :func:`ocr_scores`).
    """
    if lang == "auto":
        lang = "zh" if contains_chinese(text) else "en"
    if lang == "en":
        return text.split()
    if lang == "zh":
        return _jieba_lcut(text)
    raise ValueError(f"unknown lang {lang!r}; expected 'en', 'zh' or 'auto'")


def normalized_edit_distance(prediction: str, reference: str) -> float:
    """Character Levenshtein distance / max(len); 0.0 when both strings are empty."""
    length = max(len(prediction), len(reference))
    return 0.0 if length == 0 else Levenshtein.distance(prediction, reference) / length


def _ngram_counter(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def nltk_sentence_bleu(
    references: Sequence[Sequence[str]],
    hypothesis: Sequence[str],
    weights: Sequence[float] = (0.25, 0.25, 0.25, 0.25),
) -> float:
    """``nltk.translate.bleu_score.sentence_bleu`` with its defaults (no smoothing), re-implemented.

    * ``p_n`` = clipped n-gram matches (hypothesis count clipped by the max count over references) /
      ``max(1, number of hypothesis n-grams)``.
    * Brevity penalty with the closest reference length ``r`` (ties -> shorter) and ``c = len(hyp)``:
      1 if ``c > r``, 0 if ``c == 0``, else ``exp(1 - r / c)``.
    * If there is no unigram match the score is exactly 0. Otherwise a zero ``p_n`` is replaced by
      ``sys.float_info.min`` (nltk's ``method0``), so the score is tiny (about 1e-77 for one zero
      order with weight 1/4) but not 0 -- as nltk returns it.
    * ``BLEU = BP * exp(sum_n w_n log p_n)``.
    """
    if not references:
        raise ValueError("at least one reference is needed")
    hyp_len = len(hypothesis)
    numerators: list[int] = []
    denominators: list[int] = []
    for n in range(1, len(weights) + 1):
        counts = _ngram_counter(hypothesis, n)
        max_counts: dict[tuple[str, ...], int] = {}
        for ref in references:
            ref_counts = _ngram_counter(ref, n)
            for gram in counts:
                max_counts[gram] = max(max_counts.get(gram, 0), ref_counts[gram])
        numerators.append(sum(min(c, max_counts[g]) for g, c in counts.items()))
        denominators.append(max(1, sum(counts.values())))

    ref_len = min((len(r) for r in references), key=lambda rl: (abs(rl - hyp_len), rl))
    if hyp_len > ref_len:
        brevity = 1.0
    elif hyp_len == 0:
        brevity = 0.0
    else:
        brevity = math.exp(1 - ref_len / hyp_len)

    if numerators[0] == 0:
        return 0.0
    log_sum = math.fsum(
        w * math.log(num / den if num != 0 else sys.float_info.min)
        for w, num, den in zip(weights, numerators, denominators, strict=True)
    )
    return brevity * math.exp(log_sum)


def _set_ratio(intersection: int, size: int, other_size: int) -> float:
    if size == 0:
        return 1.0 if other_size == 0 else 0.0
    return intersection / size


def ocr_scores(prediction: str, reference: str, lang: Lang = "auto") -> dict[str, float]:
    """Fox page-OCR metrics of one page, in the standard and in the official (swapped) convention.

    ``lang="auto"`` follows the official script: jieba for both strings when either contains a CJK
    character, else whitespace split. Returns ``precision``, ``recall``, ``f1`` (word sets, prediction
    vs ground truth), ``precision_fox_official`` (= ``|GT ∩ pred| / |GT|``), ``recall_fox_official``
    (= ``|GT ∩ pred| / |pred|``), ``edit_distance`` (normalised character Levenshtein), ``one_minus_ned``,
    ``bleu`` (hypothesis = prediction, reference = GT) and ``bleu_fox_official`` (swapped, as the script).
    """
    if lang == "auto":
        lang = "zh" if contains_chinese(prediction) or contains_chinese(reference) else "en"
    pred_words = words(prediction, lang)
    gt_words = words(reference, lang)

    pred_set, gt_set = set(pred_words), set(gt_words)
    inter = len(pred_set & gt_set)
    precision = _set_ratio(inter, len(pred_set), len(gt_set))
    recall = _set_ratio(inter, len(gt_set), len(pred_set))
    # nltk.metrics.f_measure with alpha=0.5: 1 / (0.5 / p + 0.5 / r), 0 when p or r is 0
    f1 = 0.0 if precision == 0 or recall == 0 else 2 * precision * recall / (precision + recall)
    ned = normalized_edit_distance(prediction, reference)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "precision_fox_official": recall,
        "recall_fox_official": precision,
        "edit_distance": ned,
        "one_minus_ned": 1.0 - ned,
        "bleu": nltk_sentence_bleu([gt_words], pred_words),
        "bleu_fox_official": nltk_sentence_bleu([pred_words], gt_words),
    }


def corpus_ocr_scores(records: Iterable[Mapping[str, Any]], lang: Lang = "auto") -> dict[str, float]:
    """Means over pages of :func:`ocr_scores` (the official script averages per-page values).

    Each record needs ``prediction`` and ``reference`` strings; an optional ``lang`` overrides the
    default. The result also holds ``pages`` (the number of pages averaged).
    """
    totals: dict[str, float] = {}
    pages = 0
    for rec in records:
        page = ocr_scores(rec["prediction"], rec["reference"], rec.get("lang", lang))
        for key, value in page.items():
            totals[key] = totals.get(key, 0.0) + value
        pages += 1
    if pages == 0:
        raise ValueError("no pages to score")
    out = {key: value / pages for key, value in totals.items()}
    out["pages"] = float(pages)
    return out
