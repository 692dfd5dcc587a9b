"""`python -m vlm.app.prepare` on hostile input: one bad item is skipped under a named reason, never
read from outside the given folders, never hangs or exhausts memory, never aborts its split."""

import gzip
import io
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pypdfium2 as pdfium
import pytest
from PIL import Image

from tests.test_prepare import (
    QUIET,
    front_matter,
    image_bytes,
    png,
    read_back,
    save_pdf,
    skipped,
    upright_page,
)
from vlm.app import prepare as prepare_command
from vlm.data.skips import Skip
from vlm.data.sources import MAX_IMAGE_PIXELS, checked_image
from vlm.data.sources.coco import prepare_coco
from vlm.data.sources.docvqa import prepare_docvqa
from vlm.data.sources.olmocr import DEFAULT_MAX_SIDE, parse_markdown, prepare_olmocr
from vlm.data.sources.text import prepare_text


def examples(index: dict, split: str, reason: str) -> list[dict]:
    return index["splits"][split]["skipped"][reason]["examples"]


def coco_layout(root: Path, images: list[dict]) -> tuple[Path, Path]:
    """A captions file over `images` ({id, file_name}), each with one caption; `good.jpg` written."""
    (root / "images").mkdir(parents=True)
    (root / "images" / "good.jpg").write_bytes(image_bytes((12, 10)))
    annotations = [
        {"id": image["id"], "image_id": image["id"], "caption": "a red square"} for image in images
    ]
    captions = root / "captions.json"
    captions.write_text(json.dumps({"images": images, "annotations": annotations}))
    return captions, root / "images"


def prepare_cli(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    """The CLI in its own process, killed (failing the test) if it hangs."""
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "vlm.app.prepare", *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, time.monotonic() - start


def blank_pdf(path: Path, width: float, height: float) -> None:
    """A one-page PDF of width x height PDF units (1/72 inch)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf = pdfium.PdfDocument.new()
    pdf.new_page(width, height)
    pdf.save(path)
    pdf.close()


# ---------------------------------------------------------------- paths from annotation files


def test_image_paths_outside_the_given_folders_are_refused(tmp_path):
    secret_jpg = tmp_path / "secret.jpg"
    secret_jpg.write_bytes(image_bytes((8, 8)))
    captions, images = coco_layout(
        tmp_path / "coco",
        [
            {"id": 1, "file_name": "good.jpg"},
            {"id": 2, "file_name": "../../secret.jpg"},
            {"id": 3, "file_name": str(secret_jpg)},
            {"id": 4, "file_name": "link.jpg"},
        ],
    )
    (images / "link.jpg").symlink_to(secret_jpg)
    index = prepare_coco(tmp_path / "out-coco", {"train": (captions, images)}, **QUIET)
    assert index["splits"]["train"]["samples"] == 1 and skipped(index, "train") == {"outside_root": 3}
    refused = examples(index, "train", "outside_root")
    assert [e["key"] for e in refused] == ["coco-000000000002", "coco-000000000003", "coco-000000000004"]
    assert "../../secret.jpg" in refused[0]["message"] and "link.jpg" in refused[2]["message"]

    # DocVQA: the image path of a release record, relative to the JSON's folder and to --images-root
    release = tmp_path / "docvqa"
    (release / "documents").mkdir(parents=True)
    (release / "documents" / "page.png").write_bytes(png((9, 9)))
    secret_png = tmp_path / "secret.png"
    secret_png.write_bytes(png((9, 9)))
    (release / "documents" / "link.png").symlink_to(secret_png)
    paths = ["documents/page.png", "../secret.png", str(secret_png), "documents/link.png"]
    records = [
        {"questionId": qid, "question": "What?", "image": path, "answers": ["x"]}
        for qid, path in enumerate(paths, 1)
    ]
    (release / "train.json").write_text(json.dumps({"data": records}))
    index = prepare_docvqa(
        tmp_path / "out-docvqa", {"train": release / "train.json"}, images_root=release / "documents", **QUIET
    )
    assert index["splits"]["train"]["samples"] == 1 and skipped(index, "train") == {"outside_root": 3}
    assert [e["key"] for e in examples(index, "train", "outside_root")] == [
        "docvqa-2",
        "docvqa-3",
        "docvqa-4",
    ]

    # olmOCR: a parquet id or pdf_relpath that leads out of the PDF folder, a symlinked page file
    pdfs = tmp_path / "pdfs"
    save_pdf(pdfs / "good.pdf", upright_page())
    save_pdf(tmp_path / "secret.pdf", upright_page())
    rows = {
        "id": ["good", "../secret", "abs", "ok-id"],
        "pdf_relpath": [None, None, f"tarball.tar.gz:{tmp_path / 'secret.pdf'}", "t.tar.gz:../secret.pdf"],
        "natural_text": ["Page."] * 4,
    }
    pq.write_table(pa.table(rows), tmp_path / "pages.parquet")
    pairs = tmp_path / "pairs"
    save_pdf(pairs / "page.pdf", upright_page())
    (pairs / "page.md").write_text(front_matter())
    (pairs / "linked.md").write_text(front_matter())
    (pairs / "linked.pdf").symlink_to(tmp_path / "secret.pdf")
    (pairs / "borrowed.md").symlink_to(tmp_path / "secret.md")
    (tmp_path / "secret.md").write_text(front_matter())
    index = prepare_olmocr(
        tmp_path / "out-olmocr",
        {"train": [(str(tmp_path / "pages.parquet"), str(pdfs)), str(pairs)]},
        **QUIET,
    )
    assert index["splits"]["train"]["samples"] == 2 and skipped(index, "train") == {"outside_root": 5}
    assert {e["key"] for e in examples(index, "train", "outside_root")} == {
        "olmocr-secret",
        "olmocr-abs",
        "olmocr-ok-id",
        "olmocr-linked",
        "olmocr-borrowed",
    }


# ---------------------------------------------------------------- command-line names


def test_split_and_prefix_names_cannot_leave_out(tmp_path, capsys):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"text": "hello"}) + "\n")
    out = str(tmp_path / "deep" / "out")
    for name in ("../escaped", str(tmp_path / "absolute"), "a/b", "..", "."):
        assert prepare_command.main(["text", "--split", f"{name}={jsonl}", "--out", out]) == 2
        error = capsys.readouterr().err
        assert "--split" in error and repr(name) in error
    assert prepare_command.main(["text", "--split", f"train={jsonl}", "--out", out, "--prefix", "../p"]) == 2
    assert "--prefix" in capsys.readouterr().err
    assert [p.name for p in tmp_path.rglob("*")] == ["in.jsonl"]  # nothing written, --out not even made
    with pytest.raises(ValueError, match="split name"):
        prepare_text(out, {"../x": jsonl}, **QUIET)


# ---------------------------------------------------------------- encodings, special files, nulls


def test_text_line_with_bad_encoding_is_skipped_and_named(tmp_path):
    good = [json.dumps({"text": "first"}).encode(), json.dumps({"text": "third, ünïcode"}).encode()]
    latin1 = json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")
    (tmp_path / "a.jsonl").write_bytes(b"\n".join([good[0], latin1, good[1]]) + b"\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(b"\n".join([latin1, good[0]]) + b"\n")
    index = prepare_text(
        tmp_path / "out", {"train": [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"]}, **QUIET
    )
    answers = [json.loads(s["json"])["answers"] for s in read_back(tmp_path / "out", index, "train")]
    assert answers == [["first"], ["third, ünïcode"], ["first"]]
    assert skipped(index, "train") == {"bad_encoding": 2}
    messages = [e["message"] for e in examples(index, "train", "bad_encoding")]
    assert messages[0].startswith("a.jsonl line 2: ") and messages[1].startswith("b.jsonl.gz line 1: ")


def test_text_line_nested_200k_deep_is_skipped_and_named(tmp_path):
    """json.loads raises RecursionError (not a ValueError) on it: one line, not the split."""
    lines = [json.dumps({"text": "first"}).encode(), b"[" * 200_000, json.dumps({"text": "last"}).encode()]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    index = prepare_text(tmp_path / "out", {"train": [tmp_path / "a.jsonl"]}, **QUIET)
    answers = [json.loads(s["json"])["answers"] for s in read_back(tmp_path / "out", index, "train")]
    assert answers == [["first"], ["last"]]
    assert skipped(index, "train") == {"malformed": 1}
    assert examples(index, "train", "malformed")[0]["message"].startswith("a.jsonl line 2: ")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")
def test_a_named_pipe_is_never_opened_for_reading(tmp_path):
    captions, images = coco_layout(
        tmp_path / "coco", [{"id": 1, "file_name": "good.jpg"}, {"id": 2, "file_name": "pipe.jpg"}]
    )
    os.mkfifo(images / "pipe.jpg")  # reading it would wait forever for a writer
    done, _ = prepare_cli("coco", "--split", f"train={captions}:{images}", "--out", str(tmp_path / "c"))
    assert done.returncode == 0, done.stderr
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["splits"]["train"]["samples"] == 1 and skipped(index, "train") == {"not_a_file": 1}
    assert examples(index, "train", "not_a_file")[0]["key"] == "coco-000000000002"
    assert "pipe.jpg" in examples(index, "train", "not_a_file")[0]["message"]

    pairs = tmp_path / "pairs"
    save_pdf(pairs / "good.pdf", upright_page())
    (pairs / "good.md").write_text(front_matter())
    save_pdf(pairs / "pipe.pdf", upright_page())
    os.mkfifo(pairs / "pipe.md")
    os.mkfifo(pairs / "pdf-pipe.pdf")
    (pairs / "pdf-pipe.md").write_text(front_matter())
    done, _ = prepare_cli("olmocr", "--split", f"train={pairs}", "--out", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    index = json.loads((tmp_path / "o" / "index.json").read_text())
    assert index["splits"]["train"]["samples"] == 1 and skipped(index, "train") == {"not_a_file": 2}


def test_null_fields_are_skipped_not_written_as_none(tmp_path):
    captions, images = coco_layout(tmp_path / "coco", [{"id": 1, "file_name": "good.jpg"}])
    data = json.loads(captions.read_text())
    data["annotations"] = [{"id": 1, "image_id": 1, "caption": None}]
    captions.write_text(json.dumps(data))
    index = prepare_coco(tmp_path / "out-coco", {"train": (captions, images)}, **QUIET)
    assert index["splits"]["train"]["samples"] == 0
    assert skipped(index, "train") == {"malformed": 1, "no_captions": 1}

    table = pa.table(
        {
            "questionId": ["1", None, "3", "4"],
            "question": ["Fine?", "No id?", None, "Null answer?"],
            "image": pa.array(
                [{"bytes": png((9, 9)), "path": "p.png"}] * 4,
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
            "answers": [["yes"], ["x"], ["x"], [None]],
        }
    )
    pq.write_table(table, tmp_path / "validation.parquet")
    index = prepare_docvqa(tmp_path / "out-docvqa", {"val": tmp_path / "validation.parquet"}, **QUIET)
    (sample,) = read_back(tmp_path / "out-docvqa", index, "val")
    record = json.loads(sample["json"])
    assert record["answers"] == ["yes"] and "None" not in record["prompt"]
    assert skipped(index, "val") == {"malformed": 3}
    assert [e["message"] for e in examples(index, "val", "malformed")][:2] == ["no questionId", "no question"]


# ---------------------------------------------------------------- olmOCR front matter and page size

BILLION_LAUGHS = """---
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
primary_language: *i
---
Some text.
"""


def test_yaml_alias_bomb_in_front_matter_is_refused_quickly(tmp_path):
    pairs = tmp_path / "pairs"
    for name, text in (
        ("good", front_matter()),
        ("bomb", BILLION_LAUGHS),
        ("huge", "---\n" + "k: v\n" * 20_000 + "---\nText.\n"),
        ("deep", "---\nk: " + "[" * 5_000 + "]" * 5_000 + "\n---\nText.\n"),
    ):
        save_pdf(pairs / f"{name}.pdf", upright_page())
        (pairs / f"{name}.md").write_text(text)
    done, seconds = prepare_cli(
        "olmocr", "--split", f"train={pairs}", "--out", str(tmp_path / "o"), timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert seconds < 30
    index = json.loads((tmp_path / "o" / "index.json").read_text())
    assert index["splits"]["train"]["samples"] == 1 and skipped(index, "train") == {"unsafe_yaml": 3}
    messages = {e["key"]: e["message"] for e in examples(index, "train", "unsafe_yaml")}
    assert set(messages) == {"olmocr-bomb", "olmocr-huge", "olmocr-deep"}
    assert all(messages[f"olmocr-{name}"].startswith(f"{name}.md: ") for name in ("bomb", "huge", "deep"))
    # an anchor alone is refused too; plain front matter parses as before
    with pytest.raises(Skip, match="unsafe_yaml"):
        parse_markdown("---\nk: &x v\n---\n")
    assert parse_markdown("---\nis_table: true\n---\nBody\n") == ({"is_table": True}, "Body\n")


def test_olmocr_caps_the_page_side_by_default(tmp_path, capsys):
    blank_pdf(tmp_path / "wide" / "page.pdf", 3000, 100)  # 4167 x 139 px at 100 dpi
    (tmp_path / "wide" / "page.md").write_text(front_matter())
    index = prepare_olmocr(tmp_path / "out", {"train": tmp_path / "wide"}, **QUIET)
    (sample,) = read_back(tmp_path / "out", index, "train")
    assert Image.open(io.BytesIO(sample["png"])).size[0] == DEFAULT_MAX_SIDE == 2048
    args = prepare_command.build_parser().parse_args(["olmocr", "--split", "t=x", "--out", "o"])
    assert args.max_side == DEFAULT_MAX_SIDE
    with pytest.raises(SystemExit):
        prepare_command.main(["olmocr", "--help"])
    assert "default 2048" in capsys.readouterr().out

    # without a cap, a page too large to train on is skipped before it is rendered
    blank_pdf(tmp_path / "huge" / "page.pdf", 14400, 14400)  # 20000 x 20000 px at 100 dpi
    (tmp_path / "huge" / "page.md").write_text(front_matter())
    index = prepare_olmocr(tmp_path / "out-huge", {"train": tmp_path / "huge"}, max_side=0, **QUIET)
    assert skipped(index, "train") == {"image_too_large": 1}


# ---------------------------------------------------------------- image pixels


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header says width x height (the pixel data stays tiny)."""
    data = bytearray(png((1, 1)))
    header = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = zlib.crc32(header).to_bytes(4, "big")
    return bytes(data)


def test_images_over_the_pixel_cap_are_skipped_before_decoding(tmp_path):
    assert checked_image(png_claiming(1, 1))[2] == (1, 1)
    for side in (9000, 20000):  # above the cap; above Pillow's own DecompressionBombError limit
        assert side * side > MAX_IMAGE_PIXELS
        with pytest.raises(Skip) as caught:
            checked_image(png_claiming(side, side))
        assert caught.value.reason == "image_too_large" and "pixels" in caught.value.message

    captions, images = coco_layout(
        tmp_path / "coco", [{"id": 1, "file_name": "good.jpg"}, {"id": 2, "file_name": "bomb.png"}]
    )
    (images / "bomb.png").write_bytes(png_claiming(30000, 30000))
    index = prepare_coco(tmp_path / "out", {"train": (captions, images)}, **QUIET)
    assert index["splits"]["train"]["samples"] == 1 and skipped(index, "train") == {"image_too_large": 1}
    assert examples(index, "train", "image_too_large")[0]["key"] == "coco-000000000002"
