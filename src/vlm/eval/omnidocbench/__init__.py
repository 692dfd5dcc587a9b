"""OmniDocBench v1.5 end-to-end scorer, a re-implementation that agrees with the official code.

The official evaluation is github.com/opendatalab/OmniDocBench (``pdf_validation.py --config
configs/end2end.yaml``, quick_match, code of 2025-12). This package follows its algorithm step by step,
including the quirks that move numbers on real pages; see the module docstrings for what each part does
and where it deviates:

* :mod:`.markdown` — splitting a page of predicted markdown into text, formulas and tables;
* :mod:`.normalize` — text / formula / table normalisation;
* :mod:`.ground_truth` — GT loading, truncated-block merging;
* :mod:`.match` — ``quick_match`` and ``simple_match``;
* :mod:`.teds` — TEDS / TEDS-S;
* :mod:`.score` — per-page scoring and the leaderboard's page-level aggregation.

Typical use::

    from vlm.eval.omnidocbench import score_omnidocbench
    result = score_omnidocbench("OmniDocBench.json", "predictions/")
    result.metrics["text_edit"], result.metrics["table_TEDS"], result.missing
"""

from .markdown import PredBlock, markdown_table_to_html, parse_markdown
from .match import MatchedPair, quick_match, simple_match
from .normalize import normalize_formula, normalize_html_table, normalize_text
from .score import OmniDocBenchResult, read_prediction, score_omnidocbench
from .teds import teds

__all__ = [
    "MatchedPair",
    "OmniDocBenchResult",
    "PredBlock",
    "markdown_table_to_html",
    "normalize_formula",
    "normalize_html_table",
    "normalize_text",
    "parse_markdown",
    "quick_match",
    "read_prediction",
    "score_omnidocbench",
    "simple_match",
    "teds",
]
