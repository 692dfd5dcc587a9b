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
"""

from __future__ import annotations

from typing import Any

from apted import APTED, Config
from lxml import html
from rapidfuzz.distance import Levenshtein

__all__ = ["TableTree", "teds"]


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


def teds(pred: str, gt: str, structure_only: bool = False) -> float:
    """TEDS (or TEDS-S with ``structure_only``) of a predicted against a ground-truth HTML table, in [0, 1].

    Errors while parsing or computing score 0, as the official scorer does.
    """
    if not pred or not gt:
        return 0.0
    try:
        pred_table, gt_table = _table_element(pred), _table_element(gt)
        if pred_table is None or gt_table is None:
            return 0.0
        n_nodes = max(len(pred_table.xpath(".//*")), len(gt_table.xpath(".//*")))
        distance = APTED(
            _build_tree(pred_table, structure_only), _build_tree(gt_table, structure_only), _CellAwareConfig()
        ).compute_edit_distance()
        return 1.0 - float(distance) / n_nodes
    except Exception:  # the official scorer sets any failure to 0
        return 0.0
