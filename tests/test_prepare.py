"""`python -m vlm.app.prepare`: official raw layouts (written here with the real libraries) -> shards."""

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pypdfium2 as pdfium
import pytest
import webdataset as wds
from PIL import Image, ImageDraw

from vlm.app import prepare as prepare_cli
from vlm.contracts import ImagePreprocessing
from vlm.data import prepare
from vlm.data.processing import SampleProcessor
from vlm.data.shards import expand_urls
from vlm.data.sources import coco
from vlm.data.sources.coco import prepare_coco
from vlm.data.sources.docvqa import prepare_docvqa
from vlm.data.sources.olmocr import prepare_olmocr
from vlm.data.sources.text import prepare_text
from vlm.models.llms.tokenizer import ByteTokenizer

QUIET = {"progress": False}


# ---------------------------------------------------------------- fixtures in the official layouts


def image_bytes(size, fmt="JPEG", color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def make_coco(root: Path, train_images: int = 7) -> dict:
    """annotations/captions_{train,val}2017.json + {train,val}2017/*.jpg, with every kind of bad input."""
    (root / "annotations").mkdir(parents=True)
    expected = {}
    for split, count in (("train", train_images), ("val", 2)):
        folder = root / f"{split}2017"
        folder.mkdir()
        images, annotations = [], []
        for i in range(count):
            image_id = (1000 if split == "val" else 10) + 7 * (count - i)  # listed out of id order
            name = f"{image_id:012d}.jpg"
            (folder / name).write_bytes(image_bytes((20 + i, 10 + i)))
            images.append({"id": image_id, "file_name": name, "height": 10 + i, "width": 20 + i})
            captions = [f" A photo number {i}, caption {c}. \n" for c in range(3)]
            for c, caption in reversed(list(enumerate(captions))):  # annotation ids give the order
                annotations.append({"id": 100 * image_id + c, "image_id": image_id, "caption": caption})
            expected[f"coco-{image_id:012d}"] = {
                "split": split,
                "size": (20 + i, 10 + i),
                "answers": [c.strip() for c in captions],
            }
        if split == "train":
            images += [
                {"id": 1, "file_name": "missing.jpg"},  # missing_image
                {"id": 2, "file_name": "garbage.jpg"},  # corrupt_image (verify)
                {"id": 3, "file_name": "truncated.jpg"},  # corrupt_image (decode)
                {"id": 4, "file_name": "nocaption.jpg"},  # no_captions
                {"id": 5},  # malformed image record
            ]
            (folder / "garbage.jpg").write_bytes(b"not a jpeg at all")
            (folder / "truncated.jpg").write_bytes(image_bytes((64, 64), color=(1, 2, 3))[:300])
            (folder / "nocaption.jpg").write_bytes(image_bytes((8, 8)))
            annotations += [
                {"id": 1, "image_id": 1, "caption": "a missing image"},
                {"id": 2, "image_id": 2, "caption": "a garbage image"},
                {"id": 3, "image_id": 3, "caption": "a truncated image"},
                {"id": 6, "image_id": 99999, "caption": "caption of an unknown image"},  # malformed
                {"id": 7, "image_id": 1, "caption": None},  # malformed
            ]
        data = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
        (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(data))
    return expected


def shard_paths(out: Path, index: dict, split: str) -> list[Path]:
    return [out / name for name in index["splits"][split]["shards"]]


def read_back(out: Path, index: dict, split: str) -> list[dict]:
    """Samples as webdataset reads them, in shard order."""
    urls = [str(p) for p in shard_paths(out, index, split)]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def samples_per_tar(paths) -> list[int]:
    counts = []
    for path in paths:
        with tarfile.open(path) as tar:
            counts.append(len({name.split(".")[0] for name in tar.getnames()}))
    return counts


def skipped(index: dict, split: str) -> dict:
    return {reason: entry["count"] for reason, entry in index["splits"][split]["skipped"].items()}


# ---------------------------------------------------------------- COCO


def test_coco_round_trip_counts_and_reasons(tmp_path):
    expected = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    index = prepare_coco(out, root=tmp_path / "coco", samples_per_shard=3, **QUIET)
    assert json.loads((out / "index.json").read_text()) == index
    assert set(index["splits"]) == {"train", "val"} and index["source"] == "coco"

    train = read_back(out, index, "train")
    keys = [s["__key__"] for s in train]
    assert keys == sorted(k for k, v in expected.items() if v["split"] == "train")  # sorted by image id
    for raw in train:
        record = json.loads(raw["json"])
        assert record["task"] == "caption" and record["prompt"] == "<image>\nDescribe the image."
        assert record["answers"] == expected[raw["__key__"]]["answers"]  # all captions, id order
        assert record["meta"]["image_id"] == int(raw["__key__"].split("-")[1])
        assert Image.open(io.BytesIO(raw["jpg"])).size == expected[raw["__key__"]]["size"]
    # copied as they are
    first = json.loads(train[0]["json"])["meta"]["file_name"]
    assert train[0]["jpg"] == (tmp_path / "coco" / "train2017" / first).read_bytes()

    assert samples_per_tar(shard_paths(out, index, "train")) == [3, 3, 1]
    assert expand_urls(str(out / index["splits"]["train"]["urls"])) == [
        str(p) for p in shard_paths(out, index, "train")
    ]
    info = index["splits"]["train"]
    assert info["samples"] == 7 and info["items"] == 11 and info["tasks"] == {"caption": 7}
    assert skipped(index, "train") == {
        "corrupt_image": 2,
        "malformed": 3,
        "missing_image": 1,
        "no_captions": 1,
    }
    assert info["skipped"]["missing_image"]["examples"][0]["key"] == "coco-000000000001"
    assert "missing.jpg" in info["skipped"]["missing_image"]["examples"][0]["message"]
    assert {e["key"] for e in info["skipped"]["corrupt_image"]["examples"]} == {
        "coco-000000000002",
        "coco-000000000003",
    }
    assert index["splits"]["val"]["samples"] == 2 and index["tasks"] == {"caption": 9}
    assert index["skipped"]["malformed"] == 3


def test_resume_keeps_complete_shards_and_converts_only_the_rest(tmp_path, monkeypatch):
    make_coco(tmp_path / "coco", train_images=9)
    splits = {"train": (tmp_path / "coco/annotations/captions_train2017.json", tmp_path / "coco/train2017")}
    reference = prepare_coco(tmp_path / "ref", splits, samples_per_shard=2, **QUIET)
    ref_bytes = [p.read_bytes() for p in shard_paths(tmp_path / "ref", reference, "train")]
    assert samples_per_tar(shard_paths(tmp_path / "ref", reference, "train")) == [2, 2, 2, 2, 1]

    calls = []
    convert = coco.CocoConverter.__call__

    def counting(self, key, item):
        calls.append(key)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt  # a crash
        return convert(self, key, item)

    monkeypatch.setattr(coco.CocoConverter, "__call__", counting)
    out = tmp_path / "out"
    interrupt_at = 10  # items 1-4 are skipped, then 2 shards of 2, then the crash in the third
    with pytest.raises(KeyboardInterrupt):
        prepare_coco(out, splits, samples_per_shard=2, **QUIET)
    split_dir = out / "train"
    assert sorted(p.name for p in split_dir.glob("coco-*")) == [
        "coco-000000.tar",
        "coco-000001.tar",
        "coco-000002.tar.tmp",
    ]
    state = json.loads((split_dir / "_progress.json").read_text())
    consumed = state["shards"][-1]["items_end"]  # items behind the two complete shards (with skips)
    assert len(state["shards"]) == 2 and not state["complete"]

    calls.clear()
    interrupt_at = None
    index = prepare_coco(out, splits, samples_per_shard=2, **QUIET)
    assert len(calls) == index["splits"]["train"]["items"] - consumed  # kept shards not converted again
    paths = shard_paths(out, index, "train")
    assert [p.read_bytes() for p in paths] == ref_bytes  # same shards, byte for byte
    assert index["splits"]["train"] == reference["splits"]["train"]
    keys = [s["__key__"] for s in read_back(out, index, "train")]
    assert len(keys) == len(set(keys)) == 9

    # delete the last shard: only its items are converted again; a complete split is left alone
    paths[-1].unlink()
    calls.clear()
    index = prepare_coco(out, splits, samples_per_shard=2, **QUIET)
    assert calls == ["coco-000000000073"]
    assert [p.read_bytes() for p in shard_paths(out, index, "train")] == ref_bytes
    calls.clear()
    assert prepare_coco(out, splits, samples_per_shard=2, **QUIET) == index and calls == []

    # other settings: refused, unless overwrite
    with pytest.raises(prepare.PrepareError, match="samples_per_shard"):
        prepare_coco(out, splits, samples_per_shard=3, **QUIET)
    index = prepare_coco(out, splits, samples_per_shard=3, overwrite=True, **QUIET)
    assert samples_per_tar(shard_paths(out, index, "train")) == [3, 3, 3]
    assert sorted(p.name for p in split_dir.glob("coco-*")) == [f"coco-00000{i}.tar" for i in range(3)]


# ---------------------------------------------------------------- DocVQA


def png(size, color=(255, 255, 255)) -> bytes:
    return image_bytes(size, "PNG", color)


def make_docvqa_release(root: Path) -> None:
    (root / "documents").mkdir(parents=True)
    records = []
    for i, qid in enumerate([57, 3, 1200]):
        (root / "documents" / f"doc{i}_1.png").write_bytes(png((30 + i, 40 + i)))
        records.append(
            {
                "questionId": qid,
                "question": f"What is the total of item {i}?",
                "question_types": ["table/list"],
                "image": f"documents/doc{i}_1.png",
                "docId": 100 + i,
                "ucsf_document_id": "xyz",
                "ucsf_document_page_no": "1",
                "answers": [f"${i}.00", f"{i} dollars"],
                "data_split": "train",
            }
        )
    (root / "documents" / "corrupt.png").write_bytes(png((9, 9))[:40])
    records += [
        {
            "questionId": 7,
            "question": "Where?",
            "image": "documents/nothere.png",
            "docId": 1,
            "answers": ["x"],
        },
        {
            "questionId": 8,
            "question": "Which?",
            "image": "documents/corrupt.png",
            "docId": 1,
            "answers": ["y"],
        },
        {"questionId": 9, "image": "documents/doc0_1.png", "docId": 1, "answers": ["z"]},  # no question
        {"question": "no id", "image": "documents/doc0_1.png"},
    ]
    release = {"dataset_name": "SP-DocVQA", "dataset_version": "1.0", "data": records}
    (root / "train_v1.0.json").write_text(json.dumps(release))
    test = [{"questionId": 5, "question": "Date?", "image": "documents/doc1_1.png", "docId": 101}]
    (root / "test_v1.0.json").write_text(json.dumps({"dataset_name": "SP-DocVQA", "data": test}))


def make_docvqa_parquet(path: Path) -> None:
    """HF lmms-lab/DocVQA's columns; `image` is the {bytes, path} struct HF datasets writes."""
    (path.parent / "pages").mkdir(parents=True)
    (path.parent / "pages" / "on_disk.png").write_bytes(png((13, 17)))
    images = [
        {"bytes": png((21, 11)), "path": "a.png"},
        {"bytes": None, "path": "pages/on_disk.png"},  # stored next to the parquet
        {"bytes": b"\x89PNG\r\n\x1a\n garbage", "path": "bad.png"},
    ]
    table = pa.table(
        {
            "questionId": ["49153", "24580", "57349"],
            "question": ["What is the date?", "Who signed?", "Which year?"],
            "question_types": [["form"], ["handwritten"], ["others"]],
            "image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "docId": [14465, 4, 8],
            "ucsf_document_id": ["txpp0227", "a", "b"],
            "ucsf_document_page_no": ["10", "1", "2"],
            "answers": [["1/8/93", "January 8, 1993"], ["J. Doe"], ["1999"]],
            "data_split": ["validation"] * 3,
        }
    )
    pq.write_table(table, path, row_group_size=2)


def test_docvqa_release_json_and_hf_parquet(tmp_path):
    make_docvqa_release(tmp_path / "docvqa")
    make_docvqa_parquet(tmp_path / "hf" / "validation-00000-of-00001.parquet")
    splits = {
        "train": tmp_path / "docvqa" / "train_v1.0.json",
        "test": tmp_path / "docvqa" / "test_v1.0.json",
        "validation": str(tmp_path / "hf" / "validation-*.parquet"),
    }
    out = tmp_path / "out"
    index = prepare_docvqa(out, splits, samples_per_shard=2, **QUIET)

    train = read_back(out, index, "train")
    assert [s["__key__"] for s in train] == ["docvqa-3", "docvqa-57", "docvqa-1200"]  # by questionId
    record = json.loads(train[0]["json"])
    assert record["task"] == "docvqa"
    assert record["prompt"] == "<image>\nWhat is the total of item 1?\nAnswer briefly."
    assert record["answers"] == ["$1.00", "1 dollars"]
    assert record["meta"] == {
        "source": "docvqa",
        "questionId": 3,
        "docId": 101,
        "question": "What is the total of item 1?",
        "question_types": ["table/list"],
    }
    assert Image.open(io.BytesIO(train[0]["png"])).size == (31, 41)
    assert skipped(index, "train") == {"corrupt_image": 1, "malformed": 2, "missing_image": 1}

    test = read_back(out, index, "test")
    assert json.loads(test[0]["json"])["answers"] == [] and index["splits"]["test"]["no_answers"] == 1

    validation = read_back(out, index, "validation")
    assert [s["__key__"] for s in validation] == ["docvqa-49153", "docvqa-24580"]  # file order
    assert [Image.open(io.BytesIO(s["png"])).size for s in validation] == [(21, 11), (13, 17)]
    assert json.loads(validation[0]["json"])["answers"] == ["1/8/93", "January 8, 1993"]
    assert skipped(index, "validation") == {"corrupt_image": 1}
    assert samples_per_tar(shard_paths(out, index, "train")) == [2, 1]
    assert index["tasks"] == {"docvqa": 6}


# ---------------------------------------------------------------- olmOCR


def upright_page() -> Image.Image:
    """200x100 px: a black block in the top-left corner, so every rotation and flip shows."""
    page = Image.new("L", (200, 100), 255)
    ImageDraw.Draw(page).rectangle((0, 0, 79, 39), fill=0)
    return page


def save_pdf(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "PDF", resolution=100)  # 100 px per inch: 200 px = 144 pt


def is_upright(image: Image.Image) -> bool:
    gray = image.convert("L")
    w, h = gray.size
    corner = lambda x, y: gray.getpixel((int(x * w), int(y * h)))  # noqa: E731
    return (
        image.size[0] > image.size[1]
        and corner(0.1, 0.1) < 60
        and corner(0.9, 0.9) > 200
        and corner(0.9, 0.1) > 200
    )


def front_matter(rotation=0, text="Some *natural* text.\n\n| a | b |\n") -> str:
    fields = {
        "primary_language": "en",
        "is_rotation_valid": rotation == 0,
        "rotation_correction": rotation,
        "is_table": True,
        "is_diagram": False,
    }
    head = "".join(f"{k}: {v}\n" for k, v in fields.items())
    return f"---\n{head}---\n{text}"


def make_olmocr_pairs(root: Path) -> None:
    """X.pdf + X.md as olmOCR's prepare_olmocrmix writes them; stored pages turned, with the
    rotation_correction (clockwise) that makes them upright again."""
    page = upright_page()
    for name, rotation in (("a/doc-0", 0), ("a/doc-90", 90), ("b/doc-180", 180), ("b/doc-270", 270)):
        save_pdf(root / f"{name}.pdf", page.rotate(rotation, expand=True))  # PIL turns counter-clockwise
        (root / f"{name}.md").write_text(front_matter(rotation, f"Text of {name}.\n"))
    save_pdf(root / "c/no-text.pdf", page)
    (root / "c/no-text.md").write_text(front_matter(0, "\n  \n"))
    (root / "c/garbage.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (root / "c/garbage.md").write_text(front_matter())
    empty = pdfium.PdfDocument.new()
    empty.save(root / "c/empty.pdf")
    empty.close()
    (root / "c/empty.md").write_text(front_matter())
    (root / "c/lost.md").write_text(front_matter())  # no PDF
    save_pdf(root / "c/no-front-matter.pdf", page)
    (root / "c/no-front-matter.md").write_text("just text, no YAML\n")


def test_olmocr_pairs_rotation_dpi_and_bad_pdfs(tmp_path):
    make_olmocr_pairs(tmp_path / "extracted")
    out = tmp_path / "out"
    index = prepare_olmocr(out, {"train": tmp_path / "extracted"}, dpi=100, samples_per_shard=3, **QUIET)
    samples = {s["__key__"]: s for s in read_back(out, index, "train")}
    assert list(samples) == ["olmocr-a_doc-0", "olmocr-a_doc-90", "olmocr-b_doc-180", "olmocr-b_doc-270"]
    for key, raw in samples.items():
        image = Image.open(io.BytesIO(raw["png"]))
        assert image.size == (200, 100), key  # 100 dpi gives back the 200x100 px page
        assert is_upright(image), key
        record = json.loads(raw["json"])
        assert record["task"] == "ocr" and record["prompt"] == "<image>\nRead the page."
        assert record["answers"] == [f"Text of {key.removeprefix('olmocr-').replace('_', '/')}."]
        assert record["meta"]["rotation_correction"] == int(key.rsplit("-", 1)[1])
        assert record["meta"]["is_table"] is True and record["meta"]["primary_language"] == "en"
    assert skipped(index, "train") == {
        "bad_pdf": 1,
        "empty_pdf": 1,
        "malformed": 1,
        "missing_pdf": 1,
        "no_text": 1,
    }
    assert samples_per_tar(shard_paths(out, index, "train")) == [3, 1]

    # DPI and the long-side cap set the raster size; JPEG on request; two workers write the same bytes
    small = prepare_olmocr(tmp_path / "dpi50", {"train": tmp_path / "extracted"}, dpi=50, limit=2, **QUIET)
    assert [Image.open(io.BytesIO(s["png"])).size for s in read_back(tmp_path / "dpi50", small, "train")] == [
        (100, 50),
        (100, 50),
    ]
    capped = prepare_olmocr(
        tmp_path / "cap",
        {"train": tmp_path / "extracted"},
        max_side=120,
        image_format="jpeg",
        limit=2,
        **QUIET,
    )
    assert [Image.open(io.BytesIO(s["jpg"])).size for s in read_back(tmp_path / "cap", capped, "train")] == [
        (120, 60),
        (120, 60),
    ]
    pooled = prepare_olmocr(
        tmp_path / "pool", {"train": tmp_path / "extracted"}, samples_per_shard=3, workers=2, **QUIET
    )
    assert [p.read_bytes() for p in shard_paths(tmp_path / "pool", pooled, "train")] == [
        p.read_bytes() for p in shard_paths(out, index, "train")
    ]


def test_olmocr_parquet_rows_with_columns_or_response_json(tmp_path):
    pdfs = tmp_path / "pdfs"
    page = upright_page()
    save_pdf(pdfs / "aaa.pdf", page.rotate(90, expand=True))
    save_pdf(pdfs / "bbb-3.pdf", page)
    save_pdf(pdfs / "ccc.pdf", page)
    fields = ["primary_language", "is_rotation_valid", "rotation_correction", "is_table", "is_diagram"]
    columns = {
        "id": ["aaa", "bbb", "ccc", "ddd", "eee"],
        "url": ["https://example.org/a.pdf", None, None, None, None],
        "page_number": [1, 3, 1, 1, 1],
        "primary_language": ["en"] * 5,
        "is_rotation_valid": [False, True, True, True, True],
        "rotation_correction": [90, 0, 45, 0, 0],  # 45: malformed
        "is_table": [False] * 5,
        "is_diagram": [False] * 5,
        "natural_text": ["Page aaa.", "Page bbb.", "Page ccc.", None, "Page eee (no pdf)."],  # ddd: no_text
    }
    pq.write_table(pa.table(columns), tmp_path / "top_level.parquet")
    responses = [
        json.dumps(
            {**dict(zip(fields, ["en", True, 0, False, False], strict=True)), "natural_text": "Page ccc."}
        ),
        json.dumps(
            {**dict(zip(fields, ["en", True, 0, False, False], strict=True)), "natural_text": "Again."}
        ),
        "{not json",
    ]
    pq.write_table(
        pa.table(
            {"id": ["ccc", "aaa", "fff"], "url": [None] * 3, "page_number": [1] * 3, "response": responses}
        ),
        tmp_path / "zz_response.parquet",
    )
    out = tmp_path / "out"
    index = prepare_olmocr(
        out,
        {
            "train": [
                (str(tmp_path / "top_level.parquet"), str(pdfs)),
                f"{tmp_path / 'zz_response.parquet'}:{pdfs}",
            ]
        },
        **QUIET,
    )
    samples = read_back(out, index, "train")
    # ccc: rotation 45 in the first file (malformed), then fine from the response column
    assert [s["__key__"] for s in samples] == ["olmocr-aaa", "olmocr-bbb", "olmocr-ccc"]
    assert [json.loads(s["json"])["answers"] for s in samples] == [
        ["Page aaa."],
        ["Page bbb."],
        ["Page ccc."],
    ]
    assert all(is_upright(Image.open(io.BytesIO(s["png"]))) for s in samples)
    meta = json.loads(samples[0]["json"])["meta"]
    assert meta["url"] == "https://example.org/a.pdf" and meta["id"] == "aaa"
    assert meta["rotation_correction"] == 90 and meta["page_number"] == 1
    assert skipped(index, "train") == {"duplicate_key": 1, "malformed": 2, "missing_pdf": 1, "no_text": 1}


# ---------------------------------------------------------------- text


def test_text_jsonl_and_parquet_and_model_side_reading(tmp_path):
    lines = [
        json.dumps({"text": "The first document."}),
        "",
        "{broken json",
        json.dumps({"other": "no text field"}),
        json.dumps({"text": 42}),
        json.dumps({"text": "   "}),
        json.dumps({"text": "Second, with ünïcode."}),
    ]
    (tmp_path / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"content": ["From parquet.", None, "Again."]}), tmp_path / "rows.parquet")
    out = tmp_path / "out"
    index = prepare_text(out, {"train": tmp_path / "part-0.jsonl"}, samples_per_shard=1, **QUIET)
    samples = read_back(out, index, "train")
    assert [json.loads(s["json"])["answers"] for s in samples] == [
        ["The first document."],
        ["Second, with ünïcode."],
    ]
    assert all(set(s) - {"__key__", "__url__", "__local_path__"} == {"json"} for s in samples)  # no image
    record = json.loads(samples[1]["json"])
    assert record["task"] == "text" and record["prompt"] == "" and record["meta"]["line"] == 7
    assert skipped(index, "train") == {"malformed": 3, "no_text": 1}
    assert samples_per_tar(shard_paths(out, index, "train")) == [1, 1]

    parquet = prepare_text(tmp_path / "pq", {"train": tmp_path / "rows.parquet"}, column="content", **QUIET)
    assert [json.loads(s["json"])["answers"][0] for s in read_back(tmp_path / "pq", parquet, "train")] == [
        "From parquet.",
        "Again.",
    ]
    assert skipped(parquet, "train") == {"no_text": 1}

    # a text-only sample goes through the model-side reader: no image, no placeholders
    tokenizer = ByteTokenizer()
    processor = SampleProcessor(
        tokenizer, ImagePreprocessing(size=(32, 32)), vision_tokens_per_image=4, train=False
    )
    item = processor(samples[1])
    answer = list("Second, with ünïcode.".encode())
    assert [*item["prompt_ids"], *item["answer_ids"]] == [tokenizer.bos_id, *answer, tokenizer.eos_id]
    assert item["pixel_values"].shape[0] == 0


# ---------------------------------------------------------------- model-side reader, CLI


def contains(sequence: list, part: list) -> bool:
    return any(sequence[i : i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


def test_written_samples_feed_the_sample_processor_and_the_cli(tmp_path, capsys):
    make_coco(tmp_path / "coco", train_images=3)
    make_docvqa_release(tmp_path / "docvqa")
    assert (
        prepare_cli.main(
            ["coco", "--root", str(tmp_path / "coco"), "--out", str(tmp_path / "c"), "--no-progress"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "train: 3 samples" in printed and "skipped 1 missing_image" in printed
    train_json = tmp_path / "docvqa" / "train_v1.0.json"
    code = prepare_cli.main(
        ["docvqa", "--split", f"train={train_json}", "--out", str(tmp_path / "d"), "--samples-per-shard", "2"]
    )
    assert code == 0
    tokenizer = ByteTokenizer()
    processor = SampleProcessor(
        tokenizer, ImagePreprocessing(size=(32, 32)), vision_tokens_per_image=4, train=False
    )
    for out in (tmp_path / "c", tmp_path / "d"):
        index = json.loads((out / "index.json").read_text())
        raw = read_back(out, index, "train")[0]
        item = processor(raw)
        ids = [*item["prompt_ids"], *item["answer_ids"]]
        assert contains(ids, list(item["answers"][0].encode())) and ids.count(tokenizer.image_token_id) == 4
        assert item["pixel_values"].shape == (1, 3, 32, 32)

    # wrong arguments: a message, not a traceback
    assert prepare_cli.main(["coco", "--split", "train=nothing.json", "--out", str(tmp_path / "x")]) == 2
    assert "JSON:IMAGE_DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare_cli.main(["olmocr", "--help"])
    assert "rotation_correction" in capsys.readouterr().out
