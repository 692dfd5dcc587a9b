"""Matching predicted blocks to ground-truth blocks on one page (official ``simple_match`` and ``quick_match``).

Both follow the official v1.5 code (``utils/match.py``, ``utils/match_quick.py``); the costs are normalised
Levenshtein distances ``lev(a, b) / max(len a, len b)`` of the *normalised* strings.

``simple_match`` (tables always; text/formulas on request or when ``quick_match`` times out): one Hungarian
assignment (scipy ``linear_sum_assignment``), no threshold. Unmatched predicted tables are cut into their
``td`` cells (cells with a single text child) which then join the text matching as text blocks.

``quick_match`` (default for text and display formulas, matched together as one "mix"):

1. GT display formulas written as a one-column ``array`` are split into one formula per row (orders
   7.1, 7.2, ...); the same for predicted formulas. Predicted inline formulas are sorted after all other
   predictions.
2. GT blocks of the "ignore" categories (captions, footnotes, headers, footers, page numbers, equation
   captions) are matched first: every (GT, prediction) pair with cost < 0.25 is taken and those
   predictions leave the pool.
3. For the remaining GT, each prediction may absorb the following predictions (split paragraphs) when
   each absorbed piece fuzzily occurs in the GT line (best window distance < 0.6), the merged string gets
   closer to the GT, and it does not outgrow the GT line; the best merge per GT wins and overlapping
   candidate merges are resolved by the lowest average cost. Pairs with cost < 0.25 are frozen first.
4. Hungarian assignment on the (merged) costs; an assigned pair costing more than 0.7 is undone.
5. Fuzzy absorption: any prediction in which an unmatched GT line occurs with window distance < 0.4 takes
   that GT too (several GT blocks sharing one prediction are concatenated).
6. Leftover GT and leftover predictions are paired by a last Hungarian assignment (so they are scored by
   their real distance); GT left after that scores 1; predictions matching nothing are not scored.

Official quirks kept on purpose:

* after dropping empty lines the official code keeps indexing the *unfiltered* block lists for
  positions, categories and attributes, so e.g. a GT text that normalises to nothing shifts the
  reading-order positions and attributes of the blocks after it; reproduced;
* when an unmatched inline formula heads the leftover-prediction entry the official code removes that
  entry while iterating over the list, which would skip the next entry; reproduced
  (``MatchedPair.skipped``), although with the official entry order nothing follows that entry;
* ``simple_match`` treats a prediction at index 0 as "no position" (out of the reading order);
* set iteration order (CPython's) decides tie-breaks in the leftover assignment; the same set operations
  are used so the order is the same.

Deviation: the official code aborts ``quick_match`` after 30 s of wall time on a page and falls back to
``simple_match`` (``func_timeout``). The same fallback is here (``timeout_s``), but which pages hit it depends
on machine speed; this implementation is faster than the official one, so it falls back less often.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist
from scipy.optimize import linear_sum_assignment

from .ground_truth import IGNORED_TEXT_CATEGORIES, TEXT_CATEGORIES
from .markdown import FORMULA, INLINE, TEXT, PredBlock
from .normalize import normalize_formula, normalize_text

__all__ = ["MatchTimeout", "MatchedPair", "quick_match", "simple_match"]

# official thresholds
FROZEN_COST = 0.25  # pairs below this are taken as they are (ignore categories, truncation search)
MERGE_WINDOW = 0.6  # a piece may join a merge when it occurs in the GT with window distance below this
UNMATCH_COST = 0.7  # an assigned pair above this is undone
ABSORB_WINDOW = 0.4  # an unmatched GT occurring in a prediction below this is absorbed by it


class MatchTimeout(Exception):
    """``quick_match`` ran out of its time budget."""


@dataclass
class MatchedPair:
    """One official match entry. Empty ``gt_idx``/``pred_idx`` mean no GT / no prediction.

    ``gt_idx``/``pred_idx`` index the page's GT / predicted lines after empty ones are dropped.
    ``gt_position`` holds the GT ``order`` values (``None`` for a missing or zero order, ``[None]`` when
    there is no GT); ``pred_position`` the character offset of the first predicted block.
    """

    gt_idx: list[int]
    gt: str
    norm_gt: str
    gt_category: str
    gt_position: list[Any]
    gt_attribute: list[dict[str, Any]]
    pred_idx: list[int]
    pred: str
    norm_pred: str
    pred_category: str
    pred_position: int | None
    edit: float
    page: str
    skipped: bool = False

    @property
    def has_gt(self) -> bool:
        return bool(self.gt_idx)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _no_gt(page: str, **pred: Any) -> MatchedPair:
    return MatchedPair([], "", "", "", [None], [{}], page=page, edit=1.0, **pred)


# ------------------------------------------------------------------------------------- utilities


class _Deadline:
    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def check(self) -> None:
        if self.end is not None and time.monotonic() > self.end:
            raise MatchTimeout


def _ned(a: str, b: str) -> float:
    return Levenshtein.distance(a, b) / max(len(a), len(b))


def _cost_matrix(gt: Sequence[str], pred: Sequence[str]) -> np.ndarray:
    """Normalised edit distances (0 for two empty strings), as official ``compute_edit_distance_matrix_new``."""
    if not gt or not pred:
        return np.zeros((len(gt), len(pred)))
    return cdist(gt, pred, scorer=Levenshtein.normalized_distance, dtype=np.float64, workers=1)


def _largest_count(length: int, threshold: float) -> int:
    """Largest k with k / length <= threshold, evaluated in floating point like the official test."""
    k = int(threshold * length) + 1
    while k > 0 and k / length > threshold:
        k -= 1
    return k


def _best_window(hay: str, needle: str, threshold: float, deadline: _Deadline) -> float | None:
    """Smallest ``lev(window, needle) / len(needle)`` over the windows of ``hay`` as long as ``needle``.

    ``None`` when ``needle`` is empty or longer than ``hay`` (official ``sub_pred_fuzzy_matching`` /
    ``sub_gt_fuzzy_matching``). For speed the search stops once a window is below ``threshold`` and
    distances above it are capped, so the result is exact only where it matters: comparing it with
    ``threshold`` gives the same answer as comparing the official exact minimum.
    """
    n = len(needle)
    if n == 0 or len(hay) < n:
        return None
    best = _largest_count(n, threshold) + 1  # anything above the cap only needs to stay above it
    for i in range(len(hay) - n + 1):
        deadline.check()
        d = Levenshtein.distance(hay[i : i + n], needle, score_cutoff=best - 1)
        if d < best:
            best = d
            if best / n < threshold:
                break
    return best / n


def _order_of(item: dict[str, Any]) -> Any:
    """GT position for reading order: ``order`` or, failing that, ``position[0]``; falsy becomes None."""
    return item.get("order") or (item.get("position") or [None])[0] or None


def _gt_category(item: dict[str, Any]) -> str:
    return item.get("fine_category_type") or item["category_type"]


# ------------------------------------------------------------------------------------------ lines


@dataclass
class _Lines:
    """Raw and normalised lines after dropping empty ones, plus the *unfiltered* block lists."""

    gt_raw: list[str] = field(default_factory=list)
    gt_norm: list[str] = field(default_factory=list)
    gt_cat: list[str] = field(default_factory=list)
    pred_raw: list[str] = field(default_factory=list)
    pred_norm: list[str] = field(default_factory=list)
    gt_items: list[dict[str, Any]] = field(default_factory=list)
    pred_items: list[PredBlock] = field(default_factory=list)


def _keep_nonempty(lines: _Lines, gt: list[tuple[str, str, str]], pred: list[tuple[str, str]]) -> _Lines:
    for raw, norm, cat in gt:
        if raw and norm:
            lines.gt_raw.append(raw)
            lines.gt_norm.append(norm)
            lines.gt_cat.append(cat)
    for raw, norm in pred:
        if raw and norm:
            lines.pred_raw.append(raw)
            lines.pred_norm.append(norm)
    return lines


def _mix_lines(gt_items: list[dict[str, Any]], pred_items: list[PredBlock]) -> _Lines:
    """Lines for text + display-formula matching (official ``get_gt_pred_lines`` without a line type)."""
    pred = []
    for block in pred_items:
        raw = str(block.content)
        if block.kind == TEXT:
            pred.append((raw, normalize_text(raw)))
        elif block.kind == FORMULA:
            pred.append((raw, normalize_formula(raw)))
        else:
            pred.append((raw, raw))
    gt = []
    for item in gt_items:
        if item.get("content"):
            raw = str(item["content"])
            gt.append(
                (raw, normalize_text(raw) if item["category_type"] == TEXT else raw, _gt_category(item))
            )
        elif item["category_type"] in TEXT_CATEGORIES:
            raw = str(item.get("text", ""))
            gt.append((raw, normalize_text(raw), _gt_category(item)))
        elif item["category_type"] == FORMULA:
            raw = str(item.get("latex", ""))
            gt.append((raw, normalize_formula(raw), _gt_category(item)))
    return _keep_nonempty(_Lines(gt_items=gt_items, pred_items=pred_items), gt, pred)


def _table_lines(gt_items: list[dict[str, Any]], pred_items: list[PredBlock], latex: bool) -> _Lines:
    """Lines for table matching: raw markup on both sides (GT ``html``, or ``latex`` for LaTeX tables)."""
    gt = []
    for item in gt_items:
        if item.get("content"):
            gt.append((str(item["content"]), str(item["content"]), _gt_category(item)))
        elif latex:  # matched on LaTeX, reported with the GT HTML
            gt.append((str(item.get("html", "")), str(item.get("latex", "")), _gt_category(item)))
        else:
            html = str(item.get("html", ""))
            gt.append((html, html, _gt_category(item)))
    pred = [(str(b.content), str(b.content)) for b in pred_items]
    return _keep_nonempty(_Lines(gt_items=gt_items, pred_items=pred_items), gt, pred)


# ------------------------------------------------------------------------------ equation arrays

_ARRAY = re.compile(r"\\begin\{array\}\{(?P<spec>[^}]*)\}(?P<body>.*?)\\end\{array\}", re.S)
_ROW_BREAK = re.compile(r"\\\\")


def _single_column(spec: str) -> bool:
    spec = re.sub(r"\s+|\|", "", spec)
    spec = re.sub(r"@{[^}]*}", "", spec)
    spec = re.sub(r"!{[^}]*}", "", spec)
    return len(spec) == 1 and spec in "lcr"


def _array_rows(body: str) -> list[str]:
    return [row.strip() for row in _ROW_BREAK.split(body) if row.strip()]


def split_gt_arrays(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One GT formula per row of a one-column ``array`` (orders 7 -> 7.1, 7.2, ...)."""
    out = []
    for item in items:
        if item.get("category_type") == FORMULA and "\\begin{array" in item.get("latex", ""):
            m = _ARRAY.search(item["latex"])
            if m:
                if not _single_column(m.group("spec")):
                    out.append(item)
                    continue
                base = float(item.get("order") or 0)
                for k, row in enumerate(_array_rows(m.group("body")), start=1):
                    out.append({**item, "latex": f"\\[{row}\\]", "order": round(base + k / 10, 1)})
                continue
        out.append(item)
    return out


def split_pred_arrays(blocks: list[PredBlock]) -> list[PredBlock]:
    """One predicted formula per row of a one-column ``array``, positioned at the row."""
    out = []
    for block in blocks:
        m = (
            _ARRAY.search(block.content)
            if block.kind == FORMULA and "\\begin{array" in block.content
            else None
        )
        if m is None or not _single_column(m.group("spec")):
            out.append(block)
            continue
        body, cursor = m.group("body"), 0
        for row in _array_rows(body):
            at = body.find(row, cursor)
            at = cursor if at == -1 else at
            cursor = at + len(row)
            out.append(PredBlock(block.kind, block.start + m.start("body") + at, f"\\[{row}\\]", block.fine))
    return out


# --------------------------------------------------------------------------------- simple match


def _single_string(tag: Any) -> str | None:
    """bs4's ``tag.string`` (the text of a tag holding one string, possibly through single-child tags),
    without its recursion, which fails on deeply nested markup."""
    from bs4 import NavigableString

    node = tag
    while not isinstance(node, NavigableString):
        if len(node.contents) != 1:
            return None
        node = node.contents[0]
    return node


def _table_cells(blocks: list[PredBlock]) -> list[PredBlock]:
    """Text blocks from the single-string ``td`` cells of unmatched predicted tables."""
    from bs4 import BeautifulSoup

    cells = []
    for block in blocks:
        for td in BeautifulSoup(block.content, "html.parser").find_all("td"):
            text = _single_string(td)
            if text:
                cells.append(block.with_content(re.sub(r"\$\\cdot\$", "", text).strip(), kind=TEXT))
    return cells


def simple_match(
    gt_items: list[dict[str, Any]], pred_items: list[PredBlock], page: str, line_type: str = "text"
) -> tuple[list[MatchedPair], list[PredBlock]]:
    """Hungarian matching without threshold (official ``match_gt2pred_simple``).

    ``line_type`` is ``"text"`` (text + formulas), ``"html_table"`` or ``"latex_table"``. Returns the pairs
    and, for tables, the cells of unmatched predicted tables as text blocks.
    """
    table = line_type in ("html_table", "latex_table")
    lines = (
        _table_lines(gt_items, pred_items, line_type == "latex_table")
        if table
        else _mix_lines(gt_items, pred_items)
    )
    n_gt, n_pred = len(lines.gt_norm), len(lines.pred_norm)
    if n_gt == 0:
        if n_pred == 0:  # (the official code raises IndexError here)
            return [], []
        rest = list(range(n_pred))
        return [_leftover_preds(lines, rest, page)], []
    pairs = []
    if n_pred == 0:
        return [_gt_only(lines, g, page) for g in range(n_gt)], []
    cost = _cost_matrix(lines.gt_norm, lines.pred_norm)
    rows, cols = linear_sum_assignment(cost)
    assigned = dict(zip(rows.tolist(), cols.tolist(), strict=True))
    for g in range(n_gt):
        p = assigned.get(g)
        if p is None:
            pairs.append(_gt_only(lines, g, page))
            continue
        # (a prediction at index 0 counts as "no prediction" for category and position, officially)
        pairs.append(_pair(lines, g, p, float(cost[g, p]), page, zero_is_none=True))
    unmatched = [p for p in range(n_pred) if p not in assigned.values()]
    if unmatched and table:
        return pairs, _table_cells([pred_items[p] for p in unmatched])
    if unmatched:
        pairs.append(_leftover_preds(lines, unmatched, page))
    return pairs, []


def _gt_side(lines: _Lines, g: int) -> dict:
    """The GT half of a pair for GT line ``g``."""
    item = lines.gt_items[g]
    return {
        "gt_idx": [g],
        "gt": lines.gt_raw[g],
        "norm_gt": lines.gt_norm[g],
        "gt_category": lines.gt_cat[g],
        "gt_position": [_order_of(item)],
        "gt_attribute": [item.get("attribute", {})],
    }


def _pair(lines: _Lines, g: int, p: int, edit: float, page: str, zero_is_none: bool = False) -> MatchedPair:
    """A pair of GT line ``g`` and predicted line ``p`` (block lookups on the unfiltered lists)."""
    block = lines.pred_items[p]
    known = p != 0 or not zero_is_none
    return MatchedPair(
        **_gt_side(lines, g),
        pred_idx=[p],
        pred=lines.pred_raw[p],
        norm_pred=lines.pred_norm[p],
        pred_category=block.category if known else "",
        pred_position=block.start if known else None,
        edit=edit,
        page=page,
    )


def _gt_only(lines: _Lines, g: int, page: str) -> MatchedPair:
    """GT line ``g`` with no prediction (edit 1)."""
    return MatchedPair(
        **_gt_side(lines, g),
        pred_idx=[],
        pred="",
        norm_pred="",
        pred_category="",
        pred_position=None,
        edit=1.0,
        page=page,
    )


def _leftover_preds(lines: _Lines, preds: list[int], page: str) -> MatchedPair:
    first = lines.pred_items[preds[0]]
    return _no_gt(
        page,
        pred_idx=preds,
        pred="".join(lines.pred_raw[p] for p in preds),
        norm_pred="".join(lines.pred_norm[p] for p in preds),
        pred_category=first.category,
        pred_position=first.start,
    )


# ---------------------------------------------------------------------------------- quick match


class _PageMatcher:
    """The official quick_match steps over one group of GT lines and predicted lines."""

    def __init__(self, gt: list[str], pred: list[str], deadline: _Deadline):
        self.gt, self.pred, self.deadline = gt, pred, deadline
        self._window_cache: dict[tuple[int, int], float | None] = {}

    # -- step 3: merging split paragraphs -------------------------------------------------------

    def _piece_in_gt(self, g: int, p: int) -> float | None:
        key = (g, p)
        if key not in self._window_cache:
            self._window_cache[key] = _best_window(self.gt[g], self.pred[p], MERGE_WINDOW, self.deadline)
        return self._window_cache[key]

    def _judge_merge(self, g: int, pieces: list[int]) -> tuple[bool, bool]:
        """Official ``judge_pred_merge``: (take the last piece, keep extending)."""
        if len(pieces) == 1:
            return False, False
        gt = self.gt[g]
        current = " ".join(self.pred[p] for p in pieces[:-1])
        merged = " ".join(self.pred[p] for p in pieces)
        if _ned(gt, merged) > _ned(gt, current):
            return False, False
        for p in pieces[:-1]:
            d = self._piece_in_gt(g, p)
            if d is None or d > MERGE_WINDOW:
                return False, False
        added = self._piece_in_gt(g, pieces[-1])
        if added is None:
            return False, False
        return added < MERGE_WINDOW, len(merged) <= len(gt)

    def merge_split_predictions(self, cost: np.ndarray) -> tuple[np.ndarray, list[int | list[int]]]:
        """Official ``deal_with_truncated``: candidate merges of consecutive predictions per GT line."""
        frozen = np.argwhere(cost < FROZEN_COST)
        frozen_gt = {int(g) for g, _ in frozen}
        frozen_pred = {int(p) for _, p in frozen}
        free_pred = [p for p in range(len(self.pred)) if p not in frozen_pred]
        subsets, subset_costs = [], []
        for g in range(len(self.gt)):
            if g in frozen_gt:
                continue
            best, best_cost = None, math.inf
            for p in free_pred:
                step, pieces = 1, [p]
                while p + step not in frozen_pred and p + step < len(self.pred):
                    self.deadline.check()
                    pieces.append(p + step)
                    take, extend = self._judge_merge(g, pieces)
                    if not take:
                        break
                    step += 1
                    if not extend:
                        break
                merged = " ".join(self.pred[p : p + step])
                d = _ned(self.gt[g], merged)
                if d < best_cost:
                    best, best_cost = list(range(p, p + step)), d
            if best:
                subsets.append(best)
                subset_costs.append(best_cost)
        chosen = _resolve_overlaps(subsets, subset_costs)
        if not chosen:
            return cost, list(range(len(self.pred)))
        groups = _group_indices(len(self.pred), chosen)
        lines = [
            " ".join(self.pred[g[0] : g[-1] + 1]) if isinstance(g, list) else self.pred[g] for g in groups
        ]
        return _cost_matrix(self.gt, lines), groups

    # -- steps 4-5 -----------------------------------------------------------------------------

    def assign(self) -> tuple[dict[int, dict[str, Any]], list[int]]:
        """Hungarian assignment on merged predictions, undoing pairs above the cut (``process_matches``)."""
        cost, groups = self.merge_split_predictions(_cost_matrix(self.gt, self.pred))
        rows, cols = linear_sum_assignment(cost)
        row_list = rows.tolist()
        matches: dict[int, dict[str, Any]] = {}
        unmatched_gt = []
        for g in range(len(self.gt)):
            if g not in row_list:
                unmatched_gt.append(g)
                continue
            k = row_list.index(g)
            group = groups[cols[k]]
            preds = list(range(group[0], group[-1] + 1)) if isinstance(group, list) else [group]
            edit = float(cost[rows[k], cols[k]])
            if edit > UNMATCH_COST:
                unmatched_gt.append(g)
            else:
                matches[g] = {"pred_indices": preds, "edit_distance": edit}
        return matches, unmatched_gt

    def absorb(self, unmatched_gt: list[int]) -> dict[int, list[int]]:
        """Official ``fuzzy_match_unmatched_items``: predictions containing an unmatched GT line."""
        found: dict[int, list[int]] = {}
        for p, pred in enumerate(self.pred):
            hits = []
            for g in unmatched_gt:
                d = _best_window(pred, self.gt[g], ABSORB_WINDOW, self.deadline)
                if d is not None and d < ABSORB_WINDOW:
                    hits.append(g)
            if hits:
                found[p] = hits
        return found


def _resolve_overlaps(subsets: list[list[int]], costs: list[float]) -> list[list[int]]:
    """Official ``get_final_subset``: among overlapping candidate merges keep the cheapest compatible path.

    The loop mutates the path it iterates over when a cheaper duplicate replaces an entry; Python's list
    iteration semantics then skip one element, exactly as in the official code.
    """
    if not subsets or not costs:
        return []
    items = sorted(zip(subsets, costs, strict=False), key=lambda x: x[0][0])
    groups = [[items[0]]]
    for item in items[1:]:
        if any(idx in sub for sub, _ in groups[-1] for idx in item[0]):
            groups[-1].append(item)
        else:
            groups.append([item])
    final: list[list[int]] = []
    for group in groups:
        if len(group) == 1:
            final.append(group[0][0])
            continue
        paths: list[list[tuple[list[int], float]]] = [[group[0]]]
        for item in group[1:]:
            new_path = True
            for path in paths:
                is_dup = is_same = False
                for path_item in path:
                    if path_item[0] == item[0]:
                        is_dup = is_same = True
                        if path_item[1] > item[1]:
                            path.pop(path.index(path_item))
                            path.append(item)
                    elif set(path_item[0]) & set(item[0]):
                        is_dup = True
                if not is_dup:
                    path.append(item)
                    new_path = False
                if is_same:
                    new_path = False
            if new_path:
                paths.append([item])
        best_cost, best_path = math.inf, []
        for path in paths:
            avg = sum(c for _, c in path) / len(path)
            if avg < best_cost:
                best_cost, best_path = avg, [s for s, _ in path]
        final.extend(best_path)
    return final


def _group_indices(n: int, subsets: list[list[int]]) -> list[int | list[int]]:
    """Replace runs of prediction indices by their merge lists (official ``merge_lists_with_sublists``)."""
    out: list[int | list[int]] = list(range(n))
    for sub in subsets:
        try:
            at = out.index(sub[0])
        except ValueError:  # overlapping merges; the official code would crash, skip the merge instead
            continue
        del out[at : at + len(sub)]
        out.insert(at, sub)
    return out


def _merge_matches(matches: dict[int, dict[str, Any]], absorbed: dict[int, list[int]]) -> dict[tuple, dict]:
    """Official ``merge_matches``: GT lines keyed by the prediction tuple they were matched to."""
    final: dict[tuple, dict[str, Any]] = {}
    done: set[int] = set()
    for g, info in matches.items():
        key = tuple(sorted(info["pred_indices"]))
        if key in final:
            if g not in done:
                final[key]["gt_indices"].append(g)
                done.add(g)
        else:
            final[key] = {"gt_indices": [g], "edit_distance": info["edit_distance"]}
            done.add(g)
    for p, gts in absorbed.items():
        key = (p,)
        if key in final:
            for g in gts:
                if g not in done:
                    final[key]["gt_indices"].append(g)
                    done.add(g)
        else:
            final[key] = {"gt_indices": [g for g in gts if g not in done], "edit_distance": None}
            done.update(final[key]["gt_indices"])
    return final


def _recompute_edits(final: dict[tuple, dict[str, Any]], gt: list[str], pred: list[str]) -> None:
    """Official ``recalculate_edit_distances`` (only informative: the metrics recompute distances)."""
    for key, info in final.items():
        gts = sorted(set(info["gt_indices"]))
        if not gts:
            info["edit_distance"] = 1.0
        elif len(gts) > 1:
            merged_gt = "".join(gt[g] for g in gts)
            first = pred[key[0]]
            info["edit_distance"] = Levenshtein.distance(merged_gt, first) / max(
                1, len(merged_gt), len(first)
            )
        else:
            joined = " ".join(pred[p] for p in key)
            info["edit_distance"] = _ned(gt[gts[0]], joined)


def _flatten_matches(
    final: dict[tuple, dict[str, Any]], gt: list[str], pred: list[str]
) -> list[dict[str, Any]]:
    """Official ``convert_final_matches``: one entry per GT line, then leftovers paired by Hungarian."""
    entries = []
    for key, info in final.items():
        joined = " ".join(pred[p] for p in key)
        for g in sorted(set(info["gt_indices"])):
            entries.append(
                {
                    "gt_idx": g,
                    "gt": gt[g],
                    "pred_idx": list(key),
                    "pred": joined,
                    "edit": info["edit_distance"],
                }
            )
    # the same set operations as the official code, so iteration (and tie-break) order is the same
    all_gt, all_pred = set(range(len(gt))), set(range(len(pred)))
    matched_gt = set().union(*[set(info["gt_indices"]) for info in final.values()])
    unmatched_gt = all_gt - matched_gt
    unmatched_pred = all_pred - {p for key in final for p in key}
    if unmatched_pred and unmatched_gt:
        gt_order, pred_order = list(unmatched_gt), list(unmatched_pred)
        costs = [[_ned(gt[g], pred[p]) for p in pred_order] for g in gt_order]
        for i, j in zip(*linear_sum_assignment(costs), strict=True):
            g, p = gt_order[i], pred_order[j]
            entries.append({"gt_idx": g, "gt": gt[g], "pred_idx": [p], "pred": pred[p], "edit": 1.0})
    elif unmatched_pred:
        rest = list(unmatched_pred)
        entries.append(
            {"gt_idx": None, "gt": "", "pred_idx": rest, "pred": " ".join(pred[p] for p in rest), "edit": 1.0}
        )
    else:
        for g in unmatched_gt:
            entries.append({"gt_idx": g, "gt": gt[g], "pred_idx": None, "pred": "", "edit": 1.0})
    return entries


def _group_by_prediction(entries: list[dict[str, Any]], n_gt: int, gt_raw: list[str]) -> list[dict[str, Any]]:
    """Official ``merge_duplicates_add_unmatched``: GT lines sharing a prediction become one entry."""

    def key_of(entry: dict[str, Any]) -> tuple:
        return tuple(entry["pred_idx"]) if isinstance(entry["pred_idx"], list) else (entry["pred_idx"],)

    merged, seen_pred, seen_gt = [], set(), set()
    for entry in entries:
        key = key_of(entry)
        if key in seen_pred or key == (None,):
            continue
        out = {
            "gt_idx": [entry["gt_idx"]],
            "gt": entry["gt"],
            "pred_idx": entry["pred_idx"],
            "edit": entry["edit"],
        }
        for other in entries:
            if other is not entry and key_of(other) == key:
                out["gt_idx"].append(other["gt_idx"])
                seen_gt.add(other["gt_idx"])
        merged.append(out)
        seen_pred.add(key)
        seen_gt.add(entry["gt_idx"])
    for g in range(n_gt):
        if g not in seen_gt:
            merged.append({"gt_idx": [g], "gt": gt_raw[g], "pred_idx": [None], "edit": 1.0})
    return merged


@dataclass
class _Group:
    """A subset of the page's lines (ignore-category GT or the rest) with their page-level indices."""

    gt_norm: list[str]
    gt_raw: list[str]
    gt_cat: list[str]
    gt_items: list[dict[str, Any]]
    gt_index: list[int]
    pred_norm: list[str]
    pred_raw: list[str]
    pred_items: list[PredBlock]
    pred_index: list[int]


def _majority_category(categories: list[str]) -> str:
    kept = [c for c in categories if c not in IGNORED_TEXT_CATEGORIES]
    return Counter(kept or categories).most_common(1)[0][0]


def _join_formulas(lines: list[str]) -> str:
    return (
        "\\begin{array}{l} "
        + " \\\\ ".join("{" + s.strip("$").strip("\n") + "}" for s in lines)
        + " \\end{array}"
    )


def _to_pairs(
    entries: list[dict[str, Any]], grp: _Group, page: str, join_formulas: bool
) -> list[MatchedPair]:
    """Official post-processing of match entries (categories, positions, texts), quirks included."""
    pairs: list[MatchedPair] = []
    i = 0
    while i < len(entries):
        entry = entries[i]
        gt_idx = [] if entry["gt_idx"] == [None] else entry["gt_idx"]
        pred_idx = entry["pred_idx"] if isinstance(entry["pred_idx"], list) else [entry["pred_idx"]]
        pred_idx = [] if pred_idx == [None] else pred_idx
        pred_category = grp.pred_items[pred_idx[0]].category if pred_idx else ""
        if not gt_idx and pred_category == INLINE:
            # official: list.remove() inside the for loop, so the next entry is never processed
            del entries[i]
            if i < len(entries):
                skipped = entries[i]
                pairs.append(
                    _no_gt(page, pred_idx=[], pred="", norm_pred="", pred_category="", pred_position=None)
                )
                pairs[-1].skipped = True
                pairs[-1].gt_idx = [grp.gt_index[g] for g in skipped["gt_idx"] if g is not None]
            i += 1
            continue
        i += 1
        gt_raw = [grp.gt_raw[g] for g in gt_idx]
        pred_raw = [grp.pred_raw[p] for p in pred_idx]
        category = _majority_category([grp.gt_cat[g] for g in gt_idx]) if gt_idx else ""
        pairs.append(
            MatchedPair(
                gt_idx=[grp.gt_index[g] for g in gt_idx],
                gt=_join_formulas(gt_raw)
                if join_formulas and category == FORMULA and len(gt_idx) > 1
                else "".join(gt_raw),
                norm_gt="".join(grp.gt_norm[g] for g in gt_idx),
                gt_category=category,
                gt_position=[_order_of(grp.gt_items[g]) for g in gt_idx] if gt_idx else [None],
                gt_attribute=[grp.gt_items[g].get("attribute", {}) for g in gt_idx] if gt_idx else [{}],
                pred_idx=[grp.pred_index[p] for p in pred_idx],
                pred=_join_formulas(pred_raw)
                if join_formulas and "equation" in pred_category and len(pred_idx) > 1
                else "".join(pred_raw),
                norm_pred="".join(grp.pred_norm[p] for p in pred_idx),
                pred_category=pred_category,
                pred_position=grp.pred_items[pred_idx[0]].start if pred_idx else None,
                edit=float(entry["edit"]),
                page=page,
            )
        )
    return pairs


def _inline_last(blocks: list[PredBlock]) -> list[PredBlock]:
    order = sorted(enumerate(blocks), key=lambda ib: (ib[1].fine == INLINE, ib[1].start, ib[0]))
    return [b for _, b in order]


def quick_match(
    gt_items: list[dict[str, Any]],
    pred_items: list[PredBlock],
    page: str,
    timeout_s: float | None = None,
) -> list[MatchedPair]:
    """Official ``match_gt2pred_quick`` for the text + display-formula mix of one page.

    Raises :class:`MatchTimeout` when ``timeout_s`` runs out (the caller falls back to ``simple_match``).
    """
    deadline = _Deadline(timeout_s)
    gt_items = split_gt_arrays(gt_items)
    pred_items = split_pred_arrays(_inline_last(pred_items))
    lines = _mix_lines(gt_items, pred_items)
    n_gt, n_pred = len(lines.gt_norm), len(lines.pred_norm)
    if n_gt == 0:
        return [
            _no_gt(
                page,
                pred_idx=[p],
                pred=lines.pred_raw[p],
                norm_pred=lines.pred_norm[p],
                pred_category=pred_items[p].category,
                pred_position=pred_items[p].start,
            )
            for p in range(n_pred)
        ]
    if n_pred == 0:
        return [_gt_only(lines, g, page) for g in range(n_gt)]
    if n_gt == 1 and n_pred == 1:
        return [_pair(lines, 0, 0, _ned(lines.gt_norm[0], lines.pred_norm[0]), page)]

    def group(gts: list[int], preds: list[int]) -> _Group:
        # blocks are looked up on the unfiltered lists at filtered indices (official quirk)
        return _Group(
            gt_norm=[lines.gt_norm[g] for g in gts],
            gt_raw=[lines.gt_raw[g] for g in gts],
            gt_cat=[lines.gt_cat[g] for g in gts],
            gt_items=[gt_items[g] for g in gts],
            gt_index=gts,
            pred_norm=[lines.pred_norm[p] for p in preds],
            pred_raw=[lines.pred_raw[p] for p in preds],
            pred_items=[pred_items[p] for p in preds],
            pred_index=preds,
        )

    ignore_gt = [g for g in range(n_gt) if lines.gt_cat[g] in IGNORED_TEXT_CATEGORIES]
    keep_gt = [g for g in range(n_gt) if lines.gt_cat[g] not in IGNORED_TEXT_CATEGORIES]

    # step 2: ignore categories, every pair under the frozen cost (a prediction may appear twice)
    ignore_pairs: list[MatchedPair] = []
    taken_preds: list[int] = []
    if ignore_gt:
        ignore_lines = [lines.gt_norm[g] for g in ignore_gt]
        cost = _cost_matrix(ignore_lines, lines.pred_norm)
        hits = np.argwhere(cost < FROZEN_COST)
        taken_preds = [int(p) for _, p in hits]
        grp = group(ignore_gt, taken_preds)
        matches = {
            int(g): {"pred_indices": [k], "edit_distance": float(cost[g, p])} for k, (g, p) in enumerate(hits)
        }
        final = _merge_matches(matches, {})
        _recompute_edits(final, grp.gt_norm, grp.pred_norm)
        entries = _group_by_prediction(
            _flatten_matches(final, grp.gt_norm, grp.pred_norm), len(ignore_gt), grp.gt_raw
        )
        ignore_pairs = _to_pairs(entries, grp, page, join_formulas=False)

    # steps 3-6: everything else
    grp = group(keep_gt, [p for p in range(n_pred) if p not in taken_preds])
    matcher = _PageMatcher(grp.gt_norm, grp.pred_norm, deadline)
    matches, unmatched_gt = matcher.assign()
    final = _merge_matches(matches, matcher.absorb(unmatched_gt))
    _recompute_edits(final, grp.gt_norm, grp.pred_norm)
    entries = _group_by_prediction(
        _flatten_matches(final, grp.gt_norm, grp.pred_norm), len(keep_gt), grp.gt_raw
    )
    return _to_pairs(entries, grp, page, join_formulas=True) + ignore_pairs
