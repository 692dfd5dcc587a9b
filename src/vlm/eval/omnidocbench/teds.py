"""TEDS: tree-edit-distance similarity of two HTML tables (PubTabNet, Zhong et al. 2020).

Same definition as the official OmniDocBench ``metrics/table_metric.py`` (itself IBM's PubTabNet code):

* both tables are parsed with lxml (``html.fromstring``, comments dropped) and ``body/table`` is taken;
  a missing table on either side, or an empty string, scores 0;
* the tree has one node per element under the table, but does not descend into ``td`` cells; a ``td``
  node carries its ``colspan``, ``rowspan`` and the cell's content as a token list (each character of the
  text, plus ``<tag>``/``</tag>`` tokens for markup inside the cell);
* tree edit distance by APTED with unit insert/delete cost; renaming costs 1 when tag, colspan or rowspan
  differ, otherwise for two ``td`` nodes the Levenshtein distance of their token lists divided by the
  longer list (0 when both are empty) — in structure-only mode (TEDS-S) cells carry no content so a rename
  of matching cells is free;
* ``TEDS = 1 - distance / n`` where ``n`` is the larger number of descendant elements of either table
  (this count *does* include markup nested inside cells, as in the original code).

Input is normally the canonical form made by :func:`normalize.normalize_html_table`.

Bound: APTED compares every node of one tree with every node of the other, so its time grows with the
product of the two node counts. Measured here for TEDS + TEDS-S on a busy shared core: 20x20 cells
(420 x 420 nodes) 5 s, 30x30 30 s, 37x37 (2e6 node pairs) 140 s; 60x60 cells (13e6) would take many
minutes. :func:`table_teds` takes ``max_node_pairs`` and does not compare a pair above it: the pair scores
0, as a TEDS time-out does in the official scorer (120 s per pair, TEDS and TEDS-S set to 0, the table
named). A cap on the node counts, unlike a wall-clock time-out, is checked before any work, needs no
worker process and gives the same scores on every machine.
"""

from __future__ import annotations

from typing import Any

from apted import APTED, Config
from lxml import html
from rapidfuzz.distance import Levenshtein

__all__ = ["OVER_BOUND", "TableTree", "table_teds", "teds"]

OVER_BOUND = "over the node-pair bound"  # how table_teds names a pair it did not compare


class TableTree:
    """A node of the table tree in the form APTED expects (``children`` attribute)."""

    __slots__ = ("children", "colspan", "content", "rowspan", "tag")

    def __init__(self, tag: str, colspan: int | None = None, rowspan: int | None = None, content=None):
        self.tag = tag
        self.colspan = colspan
        self.rowspan = rowspan
        self.content: list[str] | None = content
        self.children: list[TableTree] = []


class _CellAwareConfig(Config):
    def rename(self, node1: TableTree, node2: TableTree) -> float:
        if node1.tag != node2.tag or node1.colspan != node2.colspan or node1.rowspan != node2.rowspan:
            return 1.0
        if node1.tag == "td" and (node1.content or node2.content):
            a, b = node1.content or [], node2.content or []
            return Levenshtein.distance(a, b) / max(len(a), len(b))
        return 0.0


def _cell_tokens(node: Any, tokens: list[str]) -> None:
    tokens.append(f"<{node.tag}>")
    if node.text is not None:
        tokens.extend(node.text)
    for child in list(node):
        _cell_tokens(child, tokens)
    if node.tag != "unk":
        tokens.append(f"</{node.tag}>")
    if node.tag != "td" and node.tail is not None:
        tokens.extend(node.tail)


def _span(node: Any, name: str) -> int:
    return int(node.attrib.get(name, "1"))


def _build_tree(node: Any, structure_only: bool) -> TableTree:
    if node.tag == "td":
        content: list[str] = []
        if not structure_only:
            _cell_tokens(node, content)
            content = content[1:-1]
        return TableTree("td", _span(node, "colspan"), _span(node, "rowspan"), content)
    tree = TableTree(node.tag)
    tree.children = [_build_tree(child, structure_only) for child in list(node)]
    return tree


def _table_element(markup: str) -> Any | None:
    parser = html.HTMLParser(remove_comments=True, encoding="utf-8")
    tables = html.fromstring(markup, parser=parser).xpath("body/table")
    return tables[0] if tables else None


def _distance_score(pred_table: Any, gt_table: Any, n_nodes: int, structure_only: bool) -> float:
    distance = APTED(
        _build_tree(pred_table, structure_only), _build_tree(gt_table, structure_only), _CellAwareConfig()
    ).compute_edit_distance()
    return 1.0 - float(distance) / n_nodes


def table_teds(pred: str, gt: str, max_node_pairs: int | None = None) -> tuple[float, float, str | None]:
    """(TEDS, TEDS-S, problem) of a predicted against a ground-truth HTML table.

    ``problem`` says why both scores were set to 0 when the computation failed or the two trees have more
    than ``max_node_pairs`` node pairs (None = no bound); None otherwise. A missing table scores 0 as usual.
    """
    if not pred or not gt:
        return 0.0, 0.0, None
    try:
        pred_table, gt_table = _table_element(pred), _table_element(gt)
        if pred_table is None or gt_table is None:
            return 0.0, 0.0, None
        n_pred, n_gt = len(pred_table.xpath(".//*")), len(gt_table.xpath(".//*"))
        if max_node_pairs is not None and n_pred * n_gt > max_node_pairs:
            return 0.0, 0.0, f"{OVER_BOUND}: {n_pred} x {n_gt} nodes > {max_node_pairs}"
        n_nodes = max(n_pred, n_gt)
        full = _distance_score(pred_table, gt_table, n_nodes, structure_only=False)
        return full, _distance_score(pred_table, gt_table, n_nodes, structure_only=True), None
    except Exception as error:  # the official scorer sets any failure to 0
        return 0.0, 0.0, f"{type(error).__name__}: {str(error)[:200]}"


def teds(pred: str, gt: str, structure_only: bool = False) -> float:
    """TEDS (or TEDS-S with ``structure_only``) of a predicted against a ground-truth HTML table, in [0, 1].

    Errors while parsing or computing score 0, as the official scorer does.
    """
    return table_teds(pred, gt)[1 if structure_only else 0]
