"""`eval.py predictions=...` on untrusted files: a bad row, page or table is skipped or bounded and named,
the rest is scored and metrics.json / report.md are still written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.test_omnidocbench import PERFECT, TABLE, synthetic_page
from vlm.config import compose
from vlm.eval.benchmarks.base import MAX_PREDICTION_SIZE, Item, Result, read_json_members
from vlm.eval.benchmarks.coco import CocoCaptions
from vlm.eval.benchmarks.docvqa import DocVQA
from vlm.eval.benchmarks.fox import Fox
from vlm.eval.benchmarks.omnidocbench import OmniDocBench
from vlm.eval.benchmarks.synthetic import SyntheticCompression
from vlm.eval.omnidocbench import normalize_html_table
from vlm.eval.omnidocbench.teds import table_teds
from vlm.eval.runner import run_benchmark, write_result

DEEP_TABLE = "<table><tr><td>" * 500 + "x" + "</td></tr></table>" * 500
HUGE = "x" * (MAX_PREDICTION_SIZE + 1)


def grid_table(rows: int, columns: int) -> str:
    cells = "".join(
        "<tr>" + "".join(f"<td>{r}.{c}</td>" for c in range(columns)) + "</tr>" for r in range(rows)
    )
    return f"<table>{cells}</table>"


def omnidocbench_run(tmp_path: Path, pages: list[dict], files: dict[str, str | bytes], **config) -> tuple:
    """Score `files` ({page stem: markdown}) against `pages` as eval.py does; (metrics, report.md)."""
    gt = tmp_path / "OmniDocBench.json"
    gt.write_text(json.dumps(pages))
    folder = tmp_path / "predictions"
    folder.mkdir()
    for stem, content in files.items():
        (folder / f"{stem}.md").write_bytes(content if isinstance(content, bytes) else content.encode())
    metrics = run_benchmark(OmniDocBench(gt=str(gt), **config), tmp_path / "out", predictions_path=folder)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics
    return metrics, (tmp_path / "out" / "report.md").read_text()


# ------------------------------------------------------------------------------------------ OmniDocBench
def test_deeply_nested_tables_in_a_prediction_are_scored(tmp_path):
    pages = [synthetic_page("page_1.jpg"), synthetic_page("page_2.jpg")]
    # page 2: the table is followed by 500 nested tables (once a RecursionError in bs4 that stopped the run)
    metrics, _ = omnidocbench_run(
        tmp_path, pages, {"page_1": PERFECT, "page_2": PERFECT + "\n\n" + DEEP_TABLE}
    )
    assert metrics["pages_scored"] == 2 and metrics["pages_unscorable"] == 0
    assert metrics["text_edit"] == 0.0 and metrics["table_TEDS"] == 1.0


def test_a_page_that_cannot_be_scored_counts_as_empty_and_is_named(tmp_path, caplog):
    pages = [synthetic_page("page_1.jpg"), synthetic_page("page_2.jpg")]
    # 40 000 unclosed tables: the official table scan restarts after each (hours); past the bound the page
    # cannot be split and is scored as empty
    with caplog.at_level(logging.WARNING):
        metrics, report = omnidocbench_run(tmp_path, pages, {"page_1": PERFECT, "page_2": "<table>" * 40_000})
    assert metrics["pages_scored"] == 2 and metrics["pages_unscorable"] == 1
    assert metrics["unscorable_pages"] == ["page_2"]
    assert metrics["text_edit"] == pytest.approx(0.5)  # page 1 perfect, page 2 scored as empty
    assert "page_2.jpg: the prediction could not be scored" in caplog.text
    assert "1 pages have a prediction that could not be scored and were scored as empty: page_2" in report
    assert "| page_2 | MarkdownTooComplex: over 2000000 table-scan steps (unclosed table tags) |" in report


def test_a_huge_table_is_not_compared_and_named(tmp_path):
    big = grid_table(60, 60)  # 3660 nodes: 13.4e6 node pairs with itself, many minutes of APTED
    page = synthetic_page("page_1.jpg")
    page["layout_dets"] = [d for d in page["layout_dets"] if d["category_type"] != "table"]
    page["layout_dets"].append(
        {"category_type": "table", "order": 6, "anno_id": 6, "html": big, "poly": [0] * 8}
    )
    metrics, report = omnidocbench_run(tmp_path, [page], {"page_1": PERFECT.replace(TABLE, big)})
    assert metrics["tables_teds_over_bound"] == 1 and metrics["table_TEDS"] == 0.0  # as an official time-out
    assert metrics["teds_zeroed_tables"] == ["page_1.jpg table [0]"]
    assert metrics["table_edit"] == 0.0  # the edit distance is still computed
    assert "over the node-pair bound: 3660 x 3660 nodes > 2000000" in report
    cfg = compose("eval", ["benchmark=omnidocbench", f"hydra.run.dir={tmp_path}"])
    assert cfg.benchmark.teds_max_node_pairs == 2_000_000


def test_the_teds_bound_counts_node_pairs():
    small = normalize_html_table(grid_table(3, 3))  # 12 nodes under <table>
    wider = normalize_html_table(grid_table(3, 4))  # 15 nodes
    assert table_teds(small, small, max_node_pairs=144) == (1.0, 1.0, None)
    teds, teds_s, problem = table_teds(small, wider, max_node_pairs=144)
    assert (teds, teds_s) == (0.0, 0.0) and problem.endswith("12 x 15 nodes > 144")
    assert table_teds(small, wider)[2] is None


def test_undecodable_and_oversized_markdown_files_are_named(tmp_path):
    pages = [synthetic_page(f"page_{i}.jpg") for i in (1, 2, 3)]
    files = {
        "page_1": PERFECT,
        "page_2": PERFECT.encode() + b" \xff \xed\xa0\x80",  # a stray byte, a UTF-8-encoded lone surrogate
        "page_3": HUGE,
    }
    metrics, report = omnidocbench_run(tmp_path, pages, files)
    assert metrics["prediction_issues"] == {"count": 2, "invalid_unicode": 1, "too_long": 1}
    assert metrics["pages_scored"] == 3 and metrics["pages_missing"] == 0
    page_2 = json.loads((tmp_path / "out" / "samples.jsonl").read_text().splitlines()[1])
    assert page_2["stem"] == "page_2" and page_2["text_edit"] == 0.0  # decoded with U+FFFD, still scored
    page_3 = json.loads((tmp_path / "out" / "samples.jsonl").read_text().splitlines()[2])
    assert page_3["text_edit"] == 1.0  # scored as empty
    assert f"{tmp_path / 'predictions' / 'page_2.md'} | invalid_unicode | decoded with U+FFFD" in report
    assert f"{tmp_path / 'predictions' / 'page_3.md'} | too_long | scored as empty" in report


def test_malformed_ground_truth_entries_are_skipped_and_named(tmp_path):
    good = json.dumps(synthetic_page("page_1.jpg"))
    entries = [good, '{"layout_dets": []}', "{broken", "[" * 200_000, good]
    gt = tmp_path / "OmniDocBench.json"
    gt.write_text("[\n" + ",\n".join(entries) + "\n]")
    folder = tmp_path / "predictions"
    folder.mkdir()
    (folder / "page_1.md").write_text(PERFECT)
    metrics = run_benchmark(OmniDocBench(gt=str(gt)), tmp_path / "out", predictions_path=folder)
    assert metrics["gt_pages_skipped"] == 4 and metrics["pages_scored"] == 1 and metrics["text_edit"] == 0.0
    report = (tmp_path / "out" / "report.md").read_text()
    for line, why in ((3, "missing page_info.image_path"), (4, "invalid_json"), (5, "nested_too_deep")):
        assert f"{gt}:{line}: " in report and why in report
    assert f"{gt}:6: image page_1.jpg appears twice" in report


# ------------------------------------------------------------------------------------------ JSON rows
def fox_release(root: Path, texts: list[str]) -> Path:
    """en_page_ocr.json of the Fox release (the images are not read when scoring predictions)."""
    root.mkdir(parents=True)
    entries = [
        {
            "image": f"en_{i}.png",
            "conversations": [{"from": "human", "value": "<image>\nOCR"}, {"from": "gpt", "value": t}],
        }
        for i, t in enumerate(texts, 1)
    ]
    (root / "en_page_ocr.json").write_text(json.dumps(entries))
    return root


def fox_row(i: int, answer) -> str:
    return json.dumps({"image": f"en_{i}.png", "lang": "en", "label": "", "answer": answer})


BAD_ROWS = {  # line in the file: (row, reason)
    3: ("{not json", "invalid_json"),
    4: ("[" * 200_000, "nested_too_deep"),
    5: (fox_row(3, "lone \ud800 surrogate"), "invalid_unicode"),  # json.dumps writes it as \\ud800
    6: (fox_row(4, ["not", "a", "string"]), "not_a_string"),
    7: (fox_row(5, HUGE), "too_long"),
    8: ('{"image": "en_6.png"}', "not_a_row"),
}


def test_bad_fox_rows_are_skipped_counted_and_named(tmp_path):
    texts = ["hello world", "good row", "x", "x", "x", "x"]
    benchmark = Fox(data_dir=str(fox_release(tmp_path / "fox", texts)), languages=["en"])
    rows = [fox_row(1, "hello world"), *(row for row, _ in BAD_ROWS.values()), fox_row(2, "good row")]
    predictions = tmp_path / "fox_predictions.json"
    predictions.write_text("[\n" + ",\n".join(rows) + "\n]")
    metrics = run_benchmark(benchmark, tmp_path / "out", predictions_path=predictions)
    reasons = [reason for _, reason in BAD_ROWS.values()]
    assert metrics["prediction_issues"] == {"count": 6, **{reason: 1 for reason in reasons}}
    assert metrics["pages"] == 6 and metrics["precision"] == pytest.approx(2 / 6)  # 2 good rows, 4 empty
    report = (tmp_path / "out" / "report.md").read_text()
    for line, (_, reason) in BAD_ROWS.items():
        assert f"{predictions}:{line} | {reason} | skipped" in report
    assert "6 predictions could not be used as given" in report


@pytest.mark.parametrize(
    ("benchmark", "row", "meta"),
    [
        (CocoCaptions(), lambda i, text: {"image_id": i, "caption": text}, "image_id"),
        (DocVQA(), lambda i, text: {"questionId": i, "answer": text}, "questionId"),
    ],
)
def test_bad_coco_and_docvqa_rows_are_skipped(tmp_path, benchmark, row, meta):
    items = [Item(f"k{i}", None, "", meta={meta: i}) for i in (1, 2, 3, 4)]
    lines = [json.dumps(row(1, "one")), "{oops", json.dumps(row(3, 3.5)), json.dumps(row(4, "four"))]
    path = tmp_path / "rows.json"
    path.write_text("[" + ",\n".join(lines) + "]")
    predictions = benchmark.read_predictions(path, items)
    assert predictions == {"k1": "one", "k4": "four"}
    assert [(i.location, i.reason) for i in predictions.issues] == [
        (f"{path}:2", "invalid_json"),
        (f"{path}:3", "not_a_string"),
    ]


def test_bad_json_lines_and_object_members_are_skipped(tmp_path):
    lines = [
        json.dumps({"key": "a", "prediction": "fine"}),
        HUGE,
        "[" * 200_000,
        '{"key": "b", "prediction": "\\udc80"}',
        json.dumps({"key": "c", "prediction": None}),
        "not json",
        json.dumps({"key": "d", "prediction": "also fine"}),
    ]
    path = tmp_path / "predictions.jsonl"
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    predictions = SyntheticCompression().read_predictions(path, [])
    assert predictions == {"a": "fine", "d": "also fine"}
    assert [(i.location, i.reason) for i in predictions.issues] == [
        (f"{path}:2", "too_long"),
        (f"{path}:3", "nested_too_deep"),
        (f"{path}:4", "invalid_unicode"),
        (f"{path}:5", "not_a_string"),
        (f"{path}:6", "invalid_json"),
        (f"{path}:8", "invalid_unicode"),
    ]

    members = tmp_path / "predictions.json"  # {key: prediction}: synthetic, longdoc, OmniDocBench as a file
    members.write_text('{"a": "fine",\n "b": ' + "[" * 200_000 + ',\n "c": 7, "d": "also fine"}')
    predictions = OmniDocBench(gt="unused").read_predictions(members, [])
    assert predictions == {"a": "fine", "c": "", "d": "also fine"}  # a bad page counts as empty
    assert [(i.location, i.reason, i.action) for i in predictions.issues] == [
        (f"{members}:2", "nested_too_deep", "skipped"),
        (f"{members}:3", "not_a_string", "scored as empty"),
    ]


def test_prediction_files_are_read_whole_only_below_a_size_cap(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("[" + ", ".join(["{}"] * 100) + "]")
    with pytest.raises(ValueError, match=r"rows\.json: 400 bytes, over the 100 bytes read whole"):
        list(read_json_members(path, "[", [], max_bytes=100))


def test_results_are_written_even_with_a_lone_surrogate_in_a_text(tmp_path):
    result = Result({"score": 1.0}, samples=[{"key": "a", "gt": "lone \ud800"}], notes=["page \ud800"])
    write_result(result, tmp_path, "bench")
    assert json.loads((tmp_path / "samples.jsonl").read_text())["gt"] == "lone ?"
    assert "page ?" in (tmp_path / "report.md").read_text()


# -- items read from shards and images for generation ---------------------------------------------------
def test_a_bad_shard_sample_is_skipped_and_named_not_fatal(tmp_path, caplog):
    """eval.py reads a benchmark's shards: a record nested 200k deep or with a lone surrogate is skipped,
    counted and named by key and shard; the good samples are items."""
    from tests.test_datamodule import samples
    from tests.test_safety_data import write_tar
    from vlm.data.processing import SkipCounter
    from vlm.eval.benchmarks.base import shard_items

    SkipCounter.drain()
    good = samples("good", 2)
    shard = write_tar(
        tmp_path / "test-000000.tar",
        [
            good[0],
            ("deep.json", b"[" * 200_000),
            ("surrogate.json", b'{"prompt": "\\ud800", "answers": []}'),
            good[1],
        ],
    )
    with caplog.at_level(logging.WARNING):
        items = shard_items([shard])
    assert [item.key for item in items] == ["good-00000", "good-00001"]
    skipped = SkipCounter.drain()
    assert skipped == {"malformed_record": 1, "invalid_unicode": 1}
    assert "'deep'" in caplog.text and "'surrogate'" in caplog.text and shard in caplog.text


def test_generation_items_that_cannot_be_read_are_named_failures(tmp_path):
    """An image whose header claims 9000 x 9000 pixels (over MAX_IMAGE_PIXELS) is refused before
    decoding, a FIFO is never opened, and a lone surrogate in a prompt never reaches the tokenizer: each
    item becomes a named failure of its own while the others are generated."""
    import os

    from tests.test_datamodule import processor
    from tests.test_safety_data import png_claiming
    from vlm.eval.runner import GenerationCollator, GenerationSet

    fifo = tmp_path / "page.png"
    os.mkfifo(fifo)
    items = [
        Item("huge", png_claiming(9000, 9000), "<image>\nRead."),
        Item("fifo", str(fifo), "<image>\nRead."),
        Item("surrogate", None, "Read \ud800 this."),
        Item("fine", None, "Read this."),
    ]
    dataset = GenerationSet(items, processor(False))
    batch = GenerationCollator(pad_id=0)([dataset[i] for i in range(len(items))])
    assert batch["keys"] == ["fine"]
    failures = dict(batch["failed"])
    assert set(failures) == {"huge", "fifo", "surrogate"}
    assert "9000x9000" in failures["huge"] and "does not exist" in failures["fifo"]
