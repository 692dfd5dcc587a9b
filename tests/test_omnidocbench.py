"""OmniDocBench v1.5 scorer: agreement with the official numbers on the real demo, TEDS, markdown parsing,
robustness, missing predictions and hand-checked perturbations."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path

import pytest

from vlm.eval.omnidocbench import normalize_html_table, parse_markdown, score_omnidocbench, teds

# ../shared next to the repository (as the other fixture-based tests), or $OMNIDOCBENCH_DEMO
_DEMO_NEXT_TO_REPO = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "omnidocbench_demo"
DEMO = (
    _DEMO_NEXT_TO_REPO
    if _DEMO_NEXT_TO_REPO.is_dir()
    else Path(os.environ.get("OMNIDOCBENCH_DEMO", "/nonexistent"))
)
needs_demo = pytest.mark.skipif(
    not (DEMO / "expected_official_v1.5.json").is_file(),
    reason="OmniDocBench demo not found (../shared/benchmarks/omnidocbench_demo or $OMNIDOCBENCH_DEMO)",
)
METRICS = (
    "text_edit",
    "table_TEDS",
    "table_TEDS_S",
    "table_edit",
    "display_formula_edit",
    "reading_order_edit",
)


# ------------------------------------------------------------------------------- synthetic page

TABLE = "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>"
PERFECT = (
    "Journal of Tests 2024\n\n# Introduction\n\nThe quick brown fox jumps over the lazy dog.\n\n"
    "Second paragraph here.\n\n$$E = mc^2$$\n\n" + TABLE + "\n"
)


def _block(category: str, order: int, anno_id: int, **fields) -> dict:
    return {
        "category_type": category,
        "order": order,
        "anno_id": anno_id,
        "ignore": False,
        "poly": [0] * 8,
        **fields,
    }


def synthetic_page(image: str = "synthetic_page_1.jpg", language: str = "english") -> dict:
    """Header (ignored category), title, two paragraphs, a display formula, a 2x2 table and a figure."""
    return {
        "page_info": {
            "page_no": 0,
            "height": 100,
            "width": 100,
            "image_path": image,
            "page_attribute": {
                "data_source": "academic_literature",
                "language": language,
                "layout": "single_column",
                "special_issue": [],
            },
        },
        "layout_dets": [
            _block("header", 1, 1, text="Journal of Tests 2024"),
            _block("title", 2, 2, text="Introduction", attribute={"text_language": "text_english"}),
            _block("text_block", 3, 3, text="The quick brown fox jumps over the lazy dog."),
            _block("text_block", 4, 4, text="Second paragraph here."),
            _block("equation_isolated", 5, 5, latex="E = mc^2"),
            _block("table", 6, 6, html=TABLE),
            _block("figure", 7, 7),
        ],
        "extra": {"relation": []},
    }


# ------------------------------------------------------------------------------------ (a) demo


@pytest.fixture(scope="module")
def demo() -> dict:
    gt = json.loads((DEMO / "OmniDocBench_demo.json").read_text(encoding="utf-8"))
    predictions = {p.stem: p.read_text(encoding="utf-8") for p in (DEMO / "predictions").glob("*.md")}
    result = score_omnidocbench(gt, DEMO / "predictions")
    expected = json.loads((DEMO / "expected_official_v1.5.json").read_text(encoding="utf-8"))
    return {"gt": gt, "predictions": predictions, "result": result, "expected": expected}


@needs_demo
def test_demo_agrees_with_the_official_v1_5_numbers(demo):
    metrics, expected = demo["result"].metrics, demo["expected"]
    for name in METRICS:
        assert metrics[name] == pytest.approx(expected[name], abs=0.005), name
    assert metrics["sample_counts"] == expected["sample_counts"]
    assert demo["result"].missing == []
    # headline with the edit-distance stand-in for CDM, labelled as such
    formula = 1 - metrics["display_formula_edit"]
    overall = ((1 - metrics["text_edit"]) * 100 + metrics["table_TEDS"] * 100 + formula * 100) / 3
    assert metrics["overall"] == pytest.approx(overall)
    assert "no CDM" in metrics["overall_formula_metric"]


@needs_demo
def test_demo_pages_and_breakdowns_are_consistent(demo):
    result = demo["result"]
    assert len(result.pages) == 18 and all(p["scored"] for p in result.pages)
    page_values = [p["text_edit"] for p in result.pages if p["text_edit"] is not None]
    assert sum(page_values) / len(page_values) == pytest.approx(result.metrics["text_edit"])
    languages = result.breakdowns["text_edit"]["language"]
    assert set(languages) == {"english", "simplified_chinese", "en_ch_mixed"}
    assert set(result.breakdowns["table_TEDS"]) >= {"data_source", "layout", "language"}
    assert (
        sum(p["counts"]["text_block"] for p in result.pages) == result.metrics["sample_counts"]["text_block"]
    )


@needs_demo
def test_demo_missing_page_is_dropped_and_empty_page_scores_one(demo, caplog):
    base = demo["result"]
    victim = next(p for p in base.pages if p["counts"]["display_formula"] == 0 and p["counts"]["table"] == 0)
    stem = victim["stem"]
    predictions = {k: v for k, v in demo["predictions"].items() if k != stem}

    with caplog.at_level(logging.WARNING, logger="vlm.eval.omnidocbench"):
        dropped = score_omnidocbench(demo["gt"], predictions)
    assert dropped.missing == [stem]
    assert any(stem in r.getMessage() for r in caplog.records)
    counts, base_counts = dropped.metrics["sample_counts"], base.metrics["sample_counts"]
    assert counts["text_block"] == base_counts["text_block"] - victim["counts"]["text_block"]
    assert counts["text_block_pages"] == 17 and counts["reading_order"] == 17
    others = [p["text_edit"] for p in base.pages if p["stem"] != stem]
    assert dropped.metrics["text_edit"] == pytest.approx(sum(others) / 17)

    emptied = score_omnidocbench(demo["gt"], {**predictions, stem: ""})
    page = next(p for p in emptied.pages if p["stem"] == stem)
    assert page["text_edit"] == 1.0 and page["reading_order_edit"] == 1.0
    assert emptied.metrics["text_edit"] == pytest.approx((sum(others) + 1.0) / 18)
    counts = emptied.metrics["sample_counts"]
    assert counts["text_block_pages"] == 18 and counts["reading_order"] == 18
    # every GT text line of the page is now its own sample (before, lines sharing a prediction were joined)
    assert page["counts"]["text_block"] >= victim["counts"]["text_block"]
    # missing="empty" is the same as an empty file
    as_empty = score_omnidocbench(demo["gt"], predictions, missing="empty")
    assert as_empty.missing == [stem]
    assert as_empty.metrics["text_edit"] == pytest.approx(emptied.metrics["text_edit"])


# -------------------------------------------------------------------------------------- (b) TEDS


def test_teds_two_by_two_with_one_wrong_cell():
    gt = normalize_html_table(TABLE)
    pred = normalize_html_table(TABLE.replace("<td>d</td>", "<td>x</td>"))
    assert teds(pred, gt) == pytest.approx(1 - 1 / 6)  # one of 6 nodes (2 tr + 4 td) renamed at cost 1
    assert teds(pred, gt, structure_only=True) == 1.0
    assert teds(gt, gt) == 1.0 and teds(gt, gt, structure_only=True) == 1.0


def test_teds_structure_and_degenerate_inputs():
    gt = normalize_html_table(TABLE)
    one_row = normalize_html_table("<table><tr><td>a</td><td>b</td></tr></table>")
    assert teds(one_row, gt) == pytest.approx(1 - 3 / 6)  # a row and its two cells deleted
    assert normalize_html_table("<table><thead><tr><th>a</th></tr></thead></table>") == (
        '<html><body><table border="1" ><tr><td>a</td></tr></table></body></html>'
    )
    assert teds("", gt) == 0.0 and teds("not a table", gt) == 0.0 and teds("<<<", "<table") == 0.0


# ------------------------------------------------------------------------------ (c) markdown parser


def _blocks(markdown: str) -> list:
    return sorted((b for blocks in parse_markdown(markdown).values() for b in blocks), key=lambda b: b.start)


def test_parser_tables():
    nested = "<table><tr><td><table><tr><td>x</td></tr></table></td></tr></table>"
    blocks = _blocks(nested + "\n\nafter")
    assert [(b.kind, b.content) for b in blocks] == [("html_table", nested), ("text_all", "after")]

    latex = _blocks("\\begin{tabular}{cc} a & b \\\\ \\end{tabular}\n\nafter")
    assert latex[0].kind == "latex_table" and latex[0].content.startswith("\\begin{tabular}{cc}")
    assert "\\end{tabular}" in latex[0].content and latex[1].content == "after"

    md = _blocks("Intro\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nAfter text.")
    table = next(b for b in md if b.kind == "html_table")
    assert table.fine == "md2html_table"
    assert normalize_html_table(table.content) == normalize_html_table(
        "<table><tr><td>a</td><td>b</td></tr><tr><td>1</td><td>2</td></tr></table>"
    ).replace("<td>", '<td colspan="1" rowspan="1">')
    assert [b.content for b in md if b.kind == "text_all"] == ["Intro", "After text."]


def test_parser_math():
    blocks = _blocks("$$x^2$$\n\n\\[ y \\]\n\nText with $x_1$ inline.")
    display = [b.content for b in blocks if b.kind == "equation_isolated" and b.fine is None]
    assert display == ["\\[x^2\\]", "\\[ y \\]"]
    inline = [b for b in blocks if b.fine == "equation_inline"]
    assert [b.content for b in inline] == ["\\[x_1\\]"]
    assert [b.content for b in blocks if b.kind == "text_all"] == ["Text with $x_1$ inline."]  # stays in text


def test_parser_code_fences_paragraphs_and_cleanup():
    # official: a closing fence at a line end is stripped first, so the code is scored as plain text
    plain = _blocks("```python\nprint(1)\n```\n\ntext")
    assert [(b.kind, b.content) for b in plain] == [("text_all", "```python\nprint(1)"), ("text_all", "text")]
    code = _blocks("```python\nprint(1)\n``` \n\ntext")
    assert (code[0].fine, code[0].content) == ("code", "print(1)")
    assert [b.content for b in _blocks("a\n\nb\nc\n\n\n\nd")] == ["a", "b\nc", "d"]
    assert [b.content for b in _blocks("line one\nline two")] == ["line one", "line two"]  # no blank line
    assert [b.content for b in _blocks("```markdown\n![fig](x.png)\n\\title{Hi}\n\nok")] == ["Hi", "ok"]


# ------------------------------------------------------------------------------ (d) robustness

MALFORMED = [
    "",
    "<table><tr><td>x",
    "</table></table><table>",
    "<table><table><tr><td>1</td></tr></table>",
    "\\begin{tabular}{cc} a & b",
    "\\end{tabular}\\end{tabular}\\begin{tabular}",
    "$$ unclosed display",
    "$",
    "| a | b\n| c",
    "a|b|\nc|d|\n",
    "\x00\ufffd\ufffe garbage \x1b[31m",
    "<html><body><p>text</p>" * 50,
    "$$\\begin{array}{l} a \\\\ b \\end{array}$$ and $\\begin{array}{l}$",
    "```\n```\n```python\n",
    "$x^{$ and \\(\\frac{\\)",
]


@pytest.mark.parametrize("markdown", MALFORMED)
def test_malformed_markdown_parses(markdown):
    parse_markdown(markdown)


def test_malformed_prediction_files_score_without_crashing(tmp_path):
    pages = [synthetic_page(f"synthetic_page_{i}.jpg") for i in range(len(MALFORMED) + 1)]
    folder = tmp_path / "pred"
    folder.mkdir()
    for i, markdown in enumerate(MALFORMED):
        (folder / f"synthetic_page_{i}.md").write_text(markdown, encoding="utf-8", errors="surrogatepass")
    (folder / f"synthetic_page_{len(MALFORMED)}.md").write_bytes(b"\xff\xfe\x00\x81 Introduction \xc3\x28")
    result = score_omnidocbench(pages, folder)
    assert result.missing == []
    for name in METRICS:
        assert 0.0 <= result.metrics[name] <= 1.0, name


def test_bad_ground_truth_is_reported_with_its_location(tmp_path):
    broken = tmp_path / "gt.json"
    broken.write_text("[{", encoding="utf-8")
    with pytest.raises(ValueError, match=r"gt\.json is not valid JSON"):
        score_omnidocbench(broken, {})
    with pytest.raises(ValueError, match=r"page 1: missing page_info\.image_path"):
        score_omnidocbench([synthetic_page(), {"layout_dets": []}], {})
    bad_dets = synthetic_page()
    bad_dets["layout_dets"] = [{"text": "no category"}]
    with pytest.raises(ValueError, match=r"page 0 \(synthetic_page_1.jpg\): layout_dets\[0\]"):
        score_omnidocbench([bad_dets], {})
    with pytest.raises(ValueError, match="not a folder"):
        score_omnidocbench([synthetic_page()], tmp_path / "nope")


# --------------------------------------------------------------------- (e) missing predictions


def test_missing_prediction_drop_and_empty(caplog):
    pages = [
        synthetic_page("synthetic_page_1.jpg"),
        synthetic_page("synthetic_page_2.jpg", language="simplified_chinese"),
    ]
    with caplog.at_level(logging.WARNING, logger="vlm.eval.omnidocbench"):
        dropped = score_omnidocbench(pages, {"synthetic_page_1": PERFECT})
    assert dropped.missing == ["synthetic_page_2"]
    assert "synthetic_page_2" in caplog.text and "dropped" in caplog.text
    assert dropped.metrics["sample_counts"]["text_block"] == 3  # title + 2 paragraphs (header ignored)
    assert dropped.metrics["sample_counts"]["text_block_pages"] == 1
    assert dropped.metrics["text_edit"] == 0.0 and dropped.metrics["table_TEDS"] == 1.0
    assert next(p for p in dropped.pages if p["stem"] == "synthetic_page_2")["scored"] is False

    kept = score_omnidocbench(pages, {"synthetic_page_1": PERFECT}, missing="empty")
    assert kept.missing == ["synthetic_page_2"]
    assert kept.metrics["sample_counts"]["text_block"] == 6
    missing_texts = [s for s in kept.samples["text_block"] if s["page"] == "synthetic_page_2.jpg"]
    assert len(missing_texts) == 3 and all(s["Edit_dist"] == 1.0 for s in missing_texts)
    assert kept.metrics["text_edit"] == pytest.approx(0.5)  # pages 0 and 1
    assert kept.metrics["table_TEDS"] == pytest.approx(0.5)
    assert kept.breakdowns["text_edit"]["language"] == {"english": 0.0, "simplified_chinese": 1.0}


# -------------------------------------------------------------------------- (f) hand reasoning


def test_perfect_prediction_scores_perfectly_with_both_matchers():
    for method in ("quick_match", "simple_match"):
        m = score_omnidocbench([synthetic_page()], {"synthetic_page_1": PERFECT}, match=method).metrics
        assert [m[k] for k in METRICS] == [0.0, 1.0, 1.0, 0.0, 0.0, 0.0], method
        assert m["overall"] == pytest.approx(100.0)


def test_removed_paragraph_and_swapped_order():
    page = [synthetic_page()]
    result = score_omnidocbench(page, {"synthetic_page_1": PERFECT.replace("Second paragraph here.\n\n", "")})
    # normalised lengths: "Introduction" 12, "Thequickbrownfoxjumpsoverthelazydog" 35, "Secondparagraphhere" 19
    assert result.metrics["text_edit"] == pytest.approx(19 / 66)
    assert result.metrics["reading_order_edit"] == pytest.approx(1 / 3)  # [2, 3, 4] vs [2, 3]
    assert result.metrics["display_formula_edit"] == 0.0 and result.metrics["table_TEDS"] == 1.0

    swapped = PERFECT.replace(
        "The quick brown fox jumps over the lazy dog.\n\nSecond paragraph here.",
        "Second paragraph here.\n\nThe quick brown fox jumps over the lazy dog.",
    )
    result = score_omnidocbench(page, {"synthetic_page_1": swapped})
    assert result.metrics["text_edit"] == 0.0
    assert result.metrics["reading_order_edit"] == pytest.approx(2 / 3)  # [2, 3, 4] vs [2, 4, 3]


def test_split_paragraph_is_merged_and_wrong_cell_costs_one_node():
    page = [synthetic_page()]
    split = PERFECT.replace("jumps over", "jumps\n\nover").replace("<td>d</td>", "<td>x</td>")
    result = score_omnidocbench(page, {"synthetic_page_1": split})
    # quick_match joins the two halves (with a space the text normalisation removes): no text error
    assert result.metrics["text_edit"] == 0.0
    pair = next(s for s in result.samples["text_block"] if s["norm_gt"].startswith("Thequick"))
    assert len(pair["pred_idx"]) == 2
    assert result.metrics["table_TEDS"] == pytest.approx(1 - 1 / 6) and result.metrics["table_TEDS_S"] == 1.0
    assert result.metrics["table_edit"] > 0.0


def test_empty_prediction_and_formula_metric_hook():
    result = score_omnidocbench(
        [synthetic_page()], {"synthetic_page_1": ""}, formula_metric=lambda gt, pred: 0.5
    )
    m = result.metrics
    assert (m["text_edit"], m["display_formula_edit"], m["table_edit"], m["reading_order_edit"]) == (
        1.0,
        1.0,
        1.0,
        1.0,
    )
    assert m["table_TEDS"] == 0.0
    assert m["display_formula_CDM"] == 0.5 and "formula_metric" in m["overall_formula_metric"]
    assert m["overall"] == pytest.approx((0 + 0 + 50) / 3)


def test_truncated_blocks_are_merged_and_unmatched_extra_text_is_free():
    page = synthetic_page()
    page["layout_dets"][2]["text"] = "The quick brown fox"
    page["layout_dets"].append(_block("text_block", 8, 8, text=" jumps over the lazy dog."))
    page["extra"]["relation"].append({"source_anno_id": 3, "target_anno_id": 8, "relation_type": "truncated"})
    noisy = PERFECT + "\n\nAn extra hallucinated paragraph that matches nothing at all."
    result = score_omnidocbench([copy.deepcopy(page)], {"synthetic_page_1": noisy})
    assert result.metrics["sample_counts"]["text_block"] == 3
    assert result.metrics["text_edit"] == 0.0
    assert not math.isnan(result.metrics["reading_order_edit"])
