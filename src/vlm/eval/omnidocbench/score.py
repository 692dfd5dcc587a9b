"""OmniDocBench v1.5 end-to-end scoring: per-page matching, then the leaderboard's page-level aggregation.

Pipeline (official ``pdf_validation.py`` with ``configs/end2end.yaml``, ``End2EndDataset``,
``metrics/cal_metric.py``, ``metrics/show_result.py``):

* Predictions are looked up per GT page by image stem (``<stem>.md``, then ``.mmd``/``.md`` without
  ``.pdf``, then ``<image name>.md``). A page with no prediction is dropped from every metric (official
  behaviour, ``missing="drop"``) or scored as an empty page (``missing="empty"``).
* Tables: GT tables vs predicted HTML tables (or LaTeX tables when there are more of those) by Hungarian
  assignment on raw-markup edit distance; unmatched predicted tables give their cells to the text pool.
  Predicted LaTeX tables are always scored as empty (the official code has no LaTeX-to-HTML step in the
  end-to-end path). Matched pairs are normalised (``normalize_html_table``) and scored by TEDS, TEDS-S and
  edit distance.
* Text and display formulas are matched together (``quick_match`` by default). Text pairs whose GT is an
  ignore category are then dropped; the rest are the text samples and give the page's reading order. A GT
  display formula matched to predicted *text* is converted to unicode (pylatexenc) and moved to the text
  samples (not to reading order).
* Edit distances are recomputed from each pair's normalised strings: ``lev(pred, gt) / max(len)``. The
  leaderboard numbers are page-level: per page ``sum(edits) / sum(max lengths)``, then the mean over
  pages (``text_edit``, ``display_formula_edit``, ``table_edit``, ``reading_order_edit``).
  ``table_TEDS``/``table_TEDS_S`` are page-level too (mean over a page's tables, then over pages: the
  official ``page`` split, which the leaderboard reports); the official ``all`` value, the mean over all
  tables, is ``table_TEDS_sample_avg``.
* ``overall`` (0-100) = ((1 - text_edit) * 100 + table_TEDS * 100 + formula * 100) / 3 where the leaderboard
  uses CDM for the formula term; without a CDM callable this uses ``1 - display_formula_edit`` and says so
  in ``overall_formula_metric``.

Untrusted predictions: a page whose prediction cannot be parsed or matched (e.g. markup nested too deeply
for a parser) is scored as an empty page and named in ``unscorable`` (it cannot score better than no
output; a page that fails even then is dropped and named). A table pair whose trees have more than
``teds_max_node_pairs`` node pairs is not compared and gets TEDS = TEDS-S = 0, as the official 120 s TEDS
time-out does; those tables and any whose TEDS failed are named in ``table_issues``.

Known deviations from the official code (besides its crashes, which become warnings or defaults here): the
quick_match time-out fallback depends on machine speed; the TEDS bound counts node pairs instead of
seconds; prediction files that are not valid UTF-8 are decoded with replacement characters instead of
failing.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rapidfuzz.distance import Levenshtein

from .ground_truth import (
    IGNORED_TEXT_CATEGORIES,
    MIX_CATEGORIES,
    TEXT_CATEGORIES,
    image_name,
    load_ground_truth,
    page_elements,
    sort_by_order,
)
from .markdown import FORMULA, HTML_TABLE, INLINE, LATEX_TABLE, MD_TABLE, parse_markdown
from .match import MatchedPair, MatchTimeout, quick_match, simple_match
from .normalize import clean_text, latex_to_unicode, normalize_html_table
from .teds import OVER_BOUND, table_teds

log = logging.getLogger(__name__)

__all__ = [
    "OmniDocBenchResult",
    "decode_prediction",
    "prediction_file",
    "read_prediction",
    "score_omnidocbench",
]

MissingPolicy = Literal["drop", "empty"]
MatchMethod = Literal["quick_match", "simple_match"]
FormulaMetric = Callable[[str, str], float]
# 1400 x 1400 nodes (37x37 cells): TEDS + TEDS-S take about as long as the official 120 s time-out allows
# (see teds.py); the demo's largest GT table has 100 nodes
TEDS_MAX_NODE_PAIRS = 2_000_000


# ----------------------------------------------------------------------------------- predictions


def decode_prediction(raw: bytes) -> str:
    """A prediction file's text: UTF-8 (undecodable bytes become U+FFFD), universal newlines, like the
    official ``open(path, encoding="utf-8").read()``."""
    return raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def prediction_file(folder: str | os.PathLike[str], image: str) -> Path | None:
    """The prediction file of page ``image`` in ``folder``, official lookup order; ``None`` when absent."""
    stem = image[:-4]
    for name in (
        f"{stem}.md",
        f"{stem.replace('.pdf', '')}.mmd",
        f"{stem.replace('.pdf', '')}.md",
        f"{image}.md",
    ):
        path = Path(folder) / name
        if path.is_file():
            return path
    return None


def read_prediction(folder: str | os.PathLike[str], image: str) -> str | None:
    """The prediction for page ``image`` in ``folder``; ``None`` when absent."""
    path = prediction_file(folder, image)
    return None if path is None else decode_prediction(path.read_bytes())


def _lookup(predictions: Mapping[str, str], image: str) -> str | None:
    for key in (image[:-4], image, image[:-4].replace(".pdf", "")):
        if key in predictions:
            text = predictions[key]
            return (
                decode_prediction(text.encode("utf-8", errors="replace")) if isinstance(text, str) else None
            )
    return None


# ---------------------------------------------------------------------------------------- samples


@dataclass
class _Sample:
    """One scored element: a matched pair, a table pair, or a page's reading order."""

    page: str
    gt: Any
    pred: Any
    norm_gt: Any = ""
    norm_pred: Any = ""
    gt_attribute: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    edit_num: float | None = None
    upper_len: int = 0
    scores: dict[str, float] = field(default_factory=dict)

    def score_edit(self) -> None:
        """Official ``call_Edit_dist`` for one sample (normalised strings when non-empty)."""
        gt = self.norm_gt or self.gt
        pred = self.norm_pred or self.pred
        self.upper_len = max(len(gt), len(pred))
        if self.upper_len:
            self.edit_num = Levenshtein.distance(pred, gt)
            self.scores["Edit_dist"] = self.edit_num / self.upper_len

    def record(self) -> dict[str, Any]:
        return {
            "page": self.page,
            "gt": self.gt,
            "pred": self.pred,
            "norm_gt": self.norm_gt,
            "norm_pred": self.norm_pred,
            "gt_attribute": self.gt_attribute,
            **self.extra,
            "edit_num": self.edit_num,
            "upper_len": self.upper_len,
            **self.scores,
        }


def _pair_sample(pair: MatchedPair) -> _Sample:
    extra = {
        "gt_idx": pair.gt_idx,
        "pred_idx": pair.pred_idx,
        "gt_category": pair.gt_category,
        "pred_category": pair.pred_category,
        "gt_position": pair.gt_position,
        "pred_position": pair.pred_position,
    }
    return _Sample(pair.page, pair.gt, pair.pred, pair.norm_gt, pair.norm_pred, pair.gt_attribute, extra)


def _reading_order(pairs: list[MatchedPair], page: str) -> _Sample | None:
    """Official ``get_order_paired``: GT orders sorted vs GT orders listed in prediction order."""
    with_gt = [p for p in pairs if p.gt_position != [None]]
    matched = [(p.gt_position, p.pred_position) for p in with_gt if p.pred_position is not None]
    gt = sorted(x for p in with_gt for x in p.gt_position if x)
    pred = [x for positions, _ in sorted(matched, key=lambda m: m[1]) for x in positions if x]
    if not gt and not pred:
        return None
    return _Sample(page, gt, pred)


# ------------------------------------------------------------------------------------ page scoring


@dataclass
class _PageMatch:
    image: str
    text: list[_Sample]
    formulas: list[_Sample]
    formula_pairs: list[MatchedPair]
    tables: list[_Sample]
    latex_tables: list[_Sample]
    order: _Sample | None
    pairs: list[MatchedPair]
    method: str


def _match_tables(
    gt_tables: list[dict[str, Any]], pred: dict[str, list], image: str
) -> tuple[list[_Sample], list[_Sample], list]:
    n_latex, n_html = len(pred.get(LATEX_TABLE, [])), len(pred.get(HTML_TABLE, []))
    latex = n_latex > n_html
    blocks = pred[LATEX_TABLE] if latex else pred.get(HTML_TABLE, [])
    pairs, cells = simple_match(gt_tables, blocks, image, "latex_table" if latex else "html_table")
    samples = [
        _Sample(
            image,
            p.gt,
            p.pred,
            gt_attribute=p.gt_attribute,
            extra={"gt_idx": p.gt_idx, "pred_idx": p.pred_idx},
        )
        for p in pairs
        if p.has_gt
    ]
    return ([], samples, cells) if latex else (samples, [], cells)


def _match_page(
    page: dict[str, Any], markdown: str, method: MatchMethod, timeout_s: float | None
) -> _PageMatch:
    image = image_name(page)
    pred = parse_markdown(markdown)
    elements = page_elements(page)
    pred_mix = [
        b for kind, blocks in pred.items() if kind not in (HTML_TABLE, LATEX_TABLE, MD_TABLE) for b in blocks
    ]
    gt_mix = sort_by_order(b for cat in MIX_CATEGORIES for b in elements.get(cat, []))

    tables: list[_Sample] = []
    latex_tables: list[_Sample] = []
    if elements.get("table"):
        tables, latex_tables, cells = _match_tables(sort_by_order(elements["table"]), pred, image)
        pred_mix += cells

    used = method
    if method == "simple_match":
        pairs, _ = simple_match(gt_mix, pred_mix, image, "text")
    else:
        try:
            pairs = quick_match(gt_mix, pred_mix, image, timeout_s)
        except MatchTimeout:
            log.warning(
                "%s: quick_match took over %.0f s, falling back to simple_match (as official)",
                image,
                timeout_s,
            )
            pairs, _ = simple_match(gt_mix, pred_mix, image, "text")
            used = "simple_match (quick_match timed out)"

    text_pairs = [
        p for p in pairs if p.gt_category in TEXT_CATEGORIES and p.gt_category not in IGNORED_TEXT_CATEGORIES
    ]
    formula_pairs = [p for p in pairs if p.gt_category == FORMULA and p.has_gt]
    order = _reading_order(text_pairs, image) if text_pairs else None
    return _PageMatch(
        image,
        [_pair_sample(p) for p in text_pairs],
        [_pair_sample(p) for p in formula_pairs],
        formula_pairs,
        tables,
        latex_tables,
        order,
        pairs,
        used,
    )


# ------------------------------------------------------------------------------------ aggregation


def _page_key(image: str, png_too: bool = False) -> str:
    """Official page id of a sample (a name not ending in .jpg loses its last ``_`` part)."""
    if image.endswith(".jpg") or (png_too and image.endswith(".png")):
        return image
    return "_".join(image.split("_")[:-1])


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _page_edit(samples: Sequence[_Sample], png_too: bool = False) -> dict[str, float]:
    """Per page ``sum(edits) / sum(max lengths)`` (NaN for a page without any length)."""
    edits: dict[str, float] = defaultdict(float)
    lengths: dict[str, int] = defaultdict(int)
    for s in samples:
        key = _page_key(s.page, png_too)
        edits[key] += s.edit_num or 0.0
        lengths[key] += s.upper_len
    return {k: edits[k] / lengths[k] if lengths[k] else math.nan for k in sorted(edits)}


def _page_mean(samples: Sequence[_Sample], metric: str, png_too: bool = False) -> dict[str, float]:
    per_page: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        if metric in s.scores:
            per_page[_page_key(s.page, png_too)].append(s.scores[metric])
    return {k: _mean(v) for k, v in sorted(per_page.items())}


def _attribute_labels(attributes: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(attribute, value) pairs of a page as the official page split uses them (no table issues)."""
    labels = []
    for key, value in attributes.items():
        if isinstance(value, list):
            labels += [(key, str(v)) for v in value if "table" not in str(v)]
        else:
            labels.append((key, str(value)))
    return labels


def _breakdown(per_page: Mapping[str, float], attributes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean of page values per page attribute value (official ``get_page_split``)."""
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for page, value in per_page.items():
        for key, label in _attribute_labels(attributes.get(page, {})):
            groups[key][label].append(value)
    return {
        key: {label: _mean(v) for label, v in sorted(vals.items())} for key, vals in sorted(groups.items())
    }


def _element_breakdown(samples: Sequence[_Sample], metric: str) -> dict[str, float]:
    """Sample mean per GT block attribute (official ``get_full_labels_results``)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        if metric not in s.scores or not s.gt_attribute:
            continue
        for label in {f"{k}: {v}" for anno in s.gt_attribute for k, v in anno.items()}:
            groups[label].append(s.scores[metric])
    return {label: _mean(v) for label, v in sorted(groups.items())}


@dataclass
class OmniDocBenchResult:
    """Scores of one prediction set.

    ``metrics``: headline numbers (names as in ``expected_official_v1.5.json``) and sample counts;
    ``pages``: one record per GT page (attributes, page-level numbers, matched pairs);
    ``breakdowns``: page-level numbers per page attribute, and per GT block attribute under ``element``;
    ``missing``: stems of pages without a prediction; ``samples``: every scored element per category;
    ``unscorable``: {stem: why} of pages whose prediction could not be scored (scored as empty);
    ``table_issues``: tables whose TEDS was set to 0 (over the node-pair bound, or failed), with why.
    """

    metrics: dict[str, Any]
    pages: list[dict[str, Any]]
    breakdowns: dict[str, Any]
    missing: list[str]
    samples: dict[str, list[dict[str, Any]]]
    unscorable: dict[str, str] = field(default_factory=dict)
    table_issues: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "pages": self.pages,
            "breakdowns": self.breakdowns,
            "missing": self.missing,
            "samples": self.samples,
            "unscorable": self.unscorable,
            "table_issues": self.table_issues,
        }


def _formula_cdm_input(text: str) -> str:
    """The official CDM preprocessing of a formula string."""
    text = text.split("```latex")[-1].split("```")[0]
    return text.lstrip("$").rstrip("$").strip().lstrip("$").rstrip("$").strip()  # (official: lstrip("$$"))


def score_omnidocbench(
    gt: str | os.PathLike[str] | Sequence[dict[str, Any]],
    predictions: str | os.PathLike[str] | Mapping[str, str],
    *,
    missing: MissingPolicy = "drop",
    match: MatchMethod = "quick_match",
    timeout_s: float | None = 30.0,
    teds_max_node_pairs: int | None = TEDS_MAX_NODE_PAIRS,
    formula_metric: FormulaMetric | None = None,
) -> OmniDocBenchResult:
    """Score markdown predictions against OmniDocBench ground truth like the official v1.5 end-to-end eval.

    Args:
        gt: path of ``OmniDocBench.json`` (or a subset) or the loaded list of page dicts.
        predictions: a folder of ``<image stem>.md`` files, or ``{image stem: markdown}``.
        missing: ``"drop"`` leaves pages without a prediction out of every metric (official);
            ``"empty"`` scores them as empty markdown.
        match: ``"quick_match"`` (official default) or ``"simple_match"`` for text and formulas.
        timeout_s: per-page budget of quick_match before falling back to simple_match (official: 30 s);
            ``None`` for no limit.
        teds_max_node_pairs: table pairs with more node pairs (predicted x GT tree nodes) score TEDS 0
            without being compared (the official scorer: a 120 s time-out); ``None`` for no bound.
        formula_metric: optional ``(gt_latex, pred_latex) -> score`` (e.g. CDM) for display formulas; used
            for the overall score instead of ``1 - display_formula_edit``.
    """
    if missing not in ("drop", "empty"):
        raise ValueError(f"missing must be 'drop' or 'empty', got {missing!r}")
    if match not in ("quick_match", "simple_match"):
        raise ValueError(f"match must be 'quick_match' or 'simple_match', got {match!r}")
    pages = load_ground_truth(gt)
    if isinstance(predictions, Mapping):
        find = lambda image: _lookup(predictions, image)  # noqa: E731
    else:
        folder = Path(predictions)
        if not folder.is_dir():
            raise ValueError(f"predictions: {folder} is not a folder of <image stem>.md files")
        find = lambda image: read_prediction(folder, image)  # noqa: E731

    absent: list[str] = []
    unscorable: dict[str, str] = {}
    matched: list[_PageMatch] = []
    for page in pages:
        image = image_name(page)
        markdown = find(image)
        if markdown is None:
            absent.append(image[:-4])
            if missing == "drop":
                continue
            markdown = ""
        page_match = _match_or_empty(page, markdown, match, timeout_s, unscorable)
        if page_match is not None:
            matched.append(page_match)
    if absent:
        shown = ", ".join(absent[:50]) + (f", ... ({len(absent) - 50} more)" if len(absent) > 50 else "")
        action = "dropped from every metric" if missing == "drop" else "scored as empty"
        log.warning("%d of %d pages have no prediction (%s): %s", len(absent), len(pages), action, shown)

    text = [s for m in matched for s in m.text]
    formulas: list[_Sample] = []
    moved = []
    for m in matched:
        for pair, sample in zip(m.formula_pairs, m.formulas, strict=True):
            if pair.pred_category in (INLINE, FORMULA, ""):
                formulas.append(sample)
            else:  # a GT formula matched to predicted text is scored as text (official)
                try:
                    sample.gt = latex_to_unicode(pair.gt)
                except Exception:  # pylatexenc is lenient; keep the LaTeX if it still fails
                    sample.gt = pair.gt
                sample.norm_gt = clean_text(sample.gt)
                moved.append(sample)
    if text:  # (official: only when some text was matched at all)
        text += moved
    tables = [s for m in matched for s in m.tables]
    for m in matched:
        for s in m.latex_tables:  # LaTeX predictions are not converted: scored as no prediction
            s.pred, s.extra["pred_idx"] = "", []
            tables.append(s)
    orders = [m.order for m in matched if m.order is not None]

    for s in text + formulas + orders:
        s.score_edit()
    table_issues = []
    for s in tables:
        problem = _score_table(s, teds_max_node_pairs)
        if problem:
            table_issues.append({"page": s.page, "gt_idx": s.extra.get("gt_idx"), "problem": problem})
            log.warning("%s, table %s: TEDS set to 0 (%s)", s.page, s.extra.get("gt_idx"), problem)
    if formula_metric is not None:
        for s in formulas:
            s.scores["CDM"] = float(formula_metric(_formula_cdm_input(s.gt), _formula_cdm_input(s.pred)))

    by_category = {"text_block": text, "display_formula": formulas, "table": tables, "reading_order": orders}
    page_values: dict[str, dict[str, float]] = {
        "text_edit": _page_edit(text),
        "display_formula_edit": _page_edit(formulas),
        "table_edit": _page_edit(tables),
        "reading_order_edit": _page_edit(orders),
        "table_TEDS": _page_mean(tables, "TEDS"),
        "table_TEDS_S": _page_mean(tables, "TEDS_structure_only"),
    }
    if formula_metric is not None:
        page_values["display_formula_CDM"] = _page_mean(formulas, "CDM")

    metrics: dict[str, Any] = {name: _mean(list(values.values())) for name, values in page_values.items()}
    metrics["table_TEDS_sample_avg"] = _mean([s.scores["TEDS"] for s in tables])
    metrics["table_TEDS_S_sample_avg"] = _mean([s.scores["TEDS_structure_only"] for s in tables])
    if formula_metric is not None:
        metrics["display_formula_CDM"] = _mean([s.scores["CDM"] for s in formulas])
        formula_score, formula_label = metrics["display_formula_CDM"], "display_formula_CDM (formula_metric)"
    else:
        formula_score, formula_label = (
            1 - metrics["display_formula_edit"],
            "1 - display_formula_edit (no CDM)",
        )
    metrics["overall"] = (
        (1 - metrics["text_edit"]) * 100 + metrics["table_TEDS"] * 100 + formula_score * 100
    ) / 3
    metrics["overall_formula_metric"] = formula_label
    metrics["sample_counts"] = {}
    for name, samples in by_category.items():
        metrics["sample_counts"][name] = len(samples)
        metrics["sample_counts"][f"{name}_pages"] = len({_page_key(s.page) for s in samples})
    metrics["pages_scored"] = len(matched)
    metrics["pages_missing"] = len(absent)
    metrics["pages_unscorable"] = len(unscorable)
    metrics["tables_teds_over_bound"] = sum(t["problem"].startswith(OVER_BOUND) for t in table_issues)
    metrics["tables_teds_failed"] = len(table_issues) - metrics["tables_teds_over_bound"]
    metrics["teds_max_node_pairs"] = teds_max_node_pairs
    metrics["match_method"] = match

    attributes = {image_name(p): p["page_info"].get("page_attribute", {}) for p in pages}
    split_values = {
        "text_edit": _page_edit(text, png_too=True),
        "display_formula_edit": _page_edit(formulas, png_too=True),
        "table_edit": _page_edit(tables, png_too=True),
        "reading_order_edit": _page_edit(orders, png_too=True),
        "table_TEDS": _page_mean(tables, "TEDS", png_too=True),
        "table_TEDS_S": _page_mean(tables, "TEDS_structure_only", png_too=True),
    }
    breakdowns: dict[str, Any] = {
        name: _breakdown(values, attributes) for name, values in split_values.items()
    }
    breakdowns["element"] = {
        "text_edit": _element_breakdown(text, "Edit_dist"),
        "display_formula_edit": _element_breakdown(formulas, "Edit_dist"),
        "table_TEDS": _element_breakdown(tables, "TEDS"),
    }

    return OmniDocBenchResult(
        metrics=metrics,
        pages=_page_records(pages, matched, absent, unscorable, page_values, by_category),
        breakdowns=breakdowns,
        missing=absent,
        samples={name: [s.record() for s in samples] for name, samples in by_category.items()},
        unscorable=unscorable,
        table_issues=table_issues,
    )


def _match_or_empty(
    page: dict[str, Any],
    markdown: str,
    method: MatchMethod,
    timeout_s: float | None,
    unscorable: dict[str, str],
) -> _PageMatch | None:
    """The page matched against its prediction; if that fails, against an empty page (named in
    ``unscorable``); if that fails too, ``None`` (the page is dropped, also named)."""
    image = image_name(page)
    try:
        return _match_page(page, markdown, method, timeout_s)
    except Exception as error:  # e.g. RecursionError in a parser on deeply nested markup
        unscorable[image[:-4]] = f"{type(error).__name__}: {str(error)[:200]}"
        log.warning("%s: the prediction could not be scored (%s); scored as an empty page", image, error)
    try:
        return _match_page(page, "", method, timeout_s)
    except Exception as error:
        unscorable[image[:-4]] += f"; dropped, the page fails even when empty ({type(error).__name__})"
        log.warning("%s: the page could not be scored even as empty (%s); dropped", image, error)
        return None


def _score_table(sample: _Sample, max_node_pairs: int | None) -> str | None:
    """TEDS, TEDS-S and edit distance of one table pair; why TEDS was set to 0, if it was."""
    try:
        sample.norm_gt = normalize_html_table(sample.gt)
        sample.norm_pred = normalize_html_table(sample.pred)
        gt_html, pred_html = sample.norm_gt or sample.gt, sample.norm_pred or sample.pred
        full, structure, problem = table_teds(pred_html, gt_html, max_node_pairs)
    except Exception as error:  # normalisation failed: TEDS 0, as any TEDS failure officially
        full, structure, problem = 0.0, 0.0, f"{type(error).__name__}: {str(error)[:200]}"
    sample.scores["TEDS"], sample.scores["TEDS_structure_only"] = full, structure
    sample.score_edit()
    return problem


def _page_records(
    pages: list[dict[str, Any]],
    matched: list[_PageMatch],
    absent: list[str],
    unscorable: dict[str, str],
    page_values: dict[str, dict[str, float]],
    by_category: dict[str, list[_Sample]],
) -> list[dict[str, Any]]:
    counts = {name: Counter(_page_key(s.page) for s in samples) for name, samples in by_category.items()}
    by_image = {m.image: m for m in matched}
    missing = set(absent)
    records = []
    for page in pages:
        image = image_name(page)
        key = _page_key(image)
        m = by_image.get(image)
        records.append(
            {
                "image": image,
                "stem": image[:-4],
                "attributes": page["page_info"].get("page_attribute", {}),
                "missing": image[:-4] in missing,
                "unscorable": unscorable.get(image[:-4]),
                "scored": m is not None,
                "match_method": m.method if m else None,
                **{name: values.get(key) for name, values in page_values.items()},
                "counts": {name: c.get(key, 0) for name, c in counts.items()},
                "pairs": [p.as_dict() for p in m.pairs] if m else [],
            }
        )
    return records
