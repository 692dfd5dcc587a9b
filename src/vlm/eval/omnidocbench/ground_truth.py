"""Loading OmniDocBench ground truth and preparing one page's elements for matching.

Follows the official ``End2EndDataset.get_page_elements`` / ``get_sorted_text_list``:

* blocks linked by a ``truncated`` relation are merged into one block with the category, ``order`` and
  ``anno_id`` of its first block (by ``order``) and the texts concatenated in ``order``. Chains are
  grouped the official way: a relation is appended to *every* existing group holding one of its ids, so a
  chain a-b, b-c gives the group [a, b, b, c] and the shared block's text appears twice — reproduced;
* the merged block carries no ``attribute``;
* text-like and display-formula blocks are sorted by ``order`` (missing/0 order sorts first, stable);
* the GT ``ignore`` flag is not used by the end-to-end evaluation (as in the official code).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "IGNORED_TEXT_CATEGORIES",
    "MIX_CATEGORIES",
    "TEXT_CATEGORIES",
    "check_page",
    "image_name",
    "load_ground_truth",
    "page_elements",
    "sort_by_order",
]

# categories matched together with the predicted text/formulas ("mix" matching, official order)
TEXT_CATEGORIES = (
    "text_block", "title", "code_txt", "code_txt_caption", "reference", "equation_caption",
    "figure_caption", "figure_footnote", "table_caption", "table_footnote", "code_algorithm",
    "code_algorithm_caption", "header", "footer", "page_footnote", "page_number",
)  # fmt: skip
MIX_CATEGORIES = (*TEXT_CATEGORIES, "equation_isolated")
# text categories matched first and then left out of the text metric and reading order
IGNORED_TEXT_CATEGORIES = (
    "figure_caption", "figure_footnote", "table_caption", "table_footnote", "code_algorithm",
    "code_algorithm_caption", "header", "footer", "page_footnote", "page_number", "equation_caption",
)  # fmt: skip

Page = dict[str, Any]


def image_name(page: Page) -> str:
    """The page's image file name (official: basename of ``page_info.image_path``)."""
    return os.path.basename(page["page_info"]["image_path"])


def check_page(page: Any, index: int) -> None:
    """Raise ValueError naming what is wrong with one page entry of the ground truth."""
    where = f"ground truth page {index}"
    if not isinstance(page, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(page).__name__}")
    info = page.get("page_info")
    if not isinstance(info, dict) or not isinstance(info.get("image_path"), str) or not info["image_path"]:
        raise ValueError(f"{where}: missing page_info.image_path")
    where = f"ground truth page {index} ({os.path.basename(info['image_path'])})"
    if not isinstance(info.get("page_attribute", {}), dict):
        raise ValueError(f"{where}: page_info.page_attribute must be an object")
    dets = page.get("layout_dets")
    if not isinstance(dets, list):
        raise ValueError(f"{where}: layout_dets must be a list")
    for j, det in enumerate(dets):
        if not isinstance(det, dict) or not isinstance(det.get("category_type"), str):
            raise ValueError(f"{where}: layout_dets[{j}] must be an object with a category_type")
    relations = (page.get("extra") or {}).get("relation", [])
    if not isinstance(relations, list) or not all(isinstance(r, dict) for r in relations):
        raise ValueError(f"{where}: extra.relation must be a list of objects")


def load_ground_truth(gt: str | os.PathLike[str] | Sequence[Page]) -> list[Page]:
    """The GT pages from an ``OmniDocBench.json`` path or an already loaded list, validated."""
    if isinstance(gt, (str, os.PathLike)):
        path = Path(gt)
        try:
            pages = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"ground truth {path} is not valid JSON: {err}") from err
        if not isinstance(pages, list):
            raise ValueError(
                f"ground truth {path}: expected a JSON list of pages, got {type(pages).__name__}"
            )
    else:
        pages = list(gt)
    names: set[str] = set()
    for i, page in enumerate(pages):
        check_page(page, i)
        name = image_name(page)
        if name in names:
            raise ValueError(f"ground truth page {i}: image {name} appears twice")
        names.add(name)
    return pages


def _truncation_groups(relations: Iterable[dict[str, Any]]) -> list[list[Any]]:
    groups: list[list[Any]] = []
    for rel in relations:
        if rel.get("relation_type") != "truncated":
            continue
        source, target = rel.get("source_anno_id"), rel.get("target_anno_id")
        joined = False
        for group in groups:
            if source in group or target in group:
                group += [source, target]
                joined = True
        if not joined:
            groups.append([source, target])
    return groups


def page_elements(page: Page) -> dict[str, list[dict[str, Any]]]:
    """The page's GT blocks by category, truncated blocks merged (merged blocks come last)."""
    groups = _truncation_groups((page.get("extra") or {}).get("relation", []))
    truncated_ids = {anno_id for group in groups for anno_id in group}
    elements: dict[str, list[dict[str, Any]]] = {}
    by_id: dict[Any, dict[str, Any]] = {}
    for det in page["layout_dets"]:
        if det.get("anno_id") in truncated_ids:
            by_id[det["anno_id"]] = det
        else:
            elements.setdefault(det["category_type"], []).append(det)
    for group in groups:
        missing = [anno_id for anno_id in group if anno_id not in by_id]
        if missing:  # the official code crashes here; such blocks are left out instead
            log.warning("%s: truncated relation names unknown anno_id %s; ignored", image_name(page), missing)
        blocks = sorted((by_id[a] for a in group if a in by_id), key=lambda b: b.get("order") or 0)
        if not blocks:
            continue
        first = blocks[0]
        merged = {
            "category_type": first["category_type"],
            "order": first.get("order"),
            "anno_id": first.get("anno_id"),
            "text": "".join(str(b.get("text", "")) for b in blocks),
            "merge_list": blocks,
        }
        elements.setdefault(first["category_type"], []).append(merged)
    return elements


def sort_by_order(blocks: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stable sort by ``order`` with a missing or zero order first (official ``get_sorted_text_list``)."""
    return sorted(blocks, key=lambda b: b.get("order") or 0)
