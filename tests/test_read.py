"""read.py and vlm.reading: a checkpoint reads your own images and PDFs, batched, with per-page timings."""

import importlib.util
import json
import sys

import pytest
from PIL import Image

from tests.conftest import ROOT, run_cli
from vlm.data.processing import Collator, SampleProcessor
from vlm.data.render import RenderStyle, render
from vlm.data.sources.olmocr import DEFAULT_PROMPT as PAGE_PROMPT
from vlm.reading import default_prompt, load_reader, page_header, read_files

TOKENS = 8  # new tokens per page: enough to compare texts, few enough to stay fast


@pytest.fixture(scope="module")
def reader(tiny_checkpoint):
    return load_reader(tiny_checkpoint, "cpu")


@pytest.fixture(scope="module")
def pages(tiny_checkpoint, tmp_path_factory, reader):
    """Two PNGs of rendered text at the model's input size."""
    folder = tmp_path_factory.mktemp("pages")
    size = tuple(reader.model.encoder.preprocessing.size)
    paths = []
    for name, text in (("a.png", "The quick brown fox."), ("b.png", "Lazy dogs sleep all day long.")):
        render(text, size, RenderStyle(font="DejaVuSans", font_size=14)).save(folder / name)
        paths.append(folder / name)
    return paths


def predicted_directly(module, paths, prompt):
    """The module's own predict path on the same images, processed and batched without vlm.reading."""
    processor = SampleProcessor.for_model(module.model, train=False)
    samples = []
    for path in paths:
        views = processor.pixel_values([Image.open(path)])
        ids = processor.encode_prompt(prompt, 1, processor.placeholders(views))
        samples.append(
            {"key": str(path), "prompt_ids": ids, "answer_ids": [], "pixel_values": views, "answers": []}
        )
    return module.predict_text(Collator(module.model.tokenizer.pad_id)(samples), TOKENS)


def test_batched_reading_matches_single_pages_and_predict_text(reader, pages):
    together = read_files(reader, pages, batch_size=2, max_new_tokens=TOKENS)
    alone = [read_files(reader, [path], batch_size=1, max_new_tokens=TOKENS).pages[0].text for path in pages]
    texts = [page.text for page in together.pages]
    assert [page.file for page in together.pages] == [str(path) for path in pages]
    assert [page.batch for page in together.pages] == [0, 0]
    assert texts == alone
    assert texts == predicted_directly(reader, pages, default_prompt(reader.cfg))
    assert together.settings["prompt"] == "<image>\nRead the text."  # conf/data/synthetic.yaml's
    assert together.settings["max_new_tokens"] == TOKENS
    assert all(page.seconds > 0 for page in together.pages) and not together.failed


def test_default_prompt_is_the_trained_one_and_overridable(reader, pages):
    assert default_prompt(reader.cfg) == reader.cfg.data.source.prompt
    assert default_prompt({"data": {"name": "olmocr"}}) == PAGE_PROMPT  # real pages' shards
    reading = read_files(reader, pages[:1], prompt="Transcribe.", max_new_tokens=TOKENS)
    assert reading.settings["prompt"] == "Transcribe."
    assert [page.text for page in reading.pages] == predicted_directly(reader, pages[:1], "Transcribe.")
    with pytest.raises(ValueError, match="at most one"):
        read_files(reader, pages, prompt="<image><image> both")


def test_ngram_guard_from_checkpoint_unless_overridden(tiny_checkpoint, pages):
    module = load_reader(tiny_checkpoint, "cpu")
    kept = read_files(module, pages[:1], max_new_tokens=TOKENS)
    assert kept.settings["generation"]["no_repeat_ngram_size"] == module.cfg.generation.no_repeat_ngram_size
    guarded = read_files(module, pages[:1], max_new_tokens=TOKENS, no_repeat_ngram_size=2, ngram_window=16)
    assert guarded.settings["generation"].items() >= {"no_repeat_ngram_size": 2, "ngram_window": 16}.items()
    assert module.cfg.generation.no_repeat_ngram_size == 2  # what predict_text decodes with


def test_bad_inputs_are_skipped_and_named(reader, pages, tmp_path, caplog):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    missing = tmp_path / "missing.jpg"
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    reading = read_files(reader, [pages[0], corrupt, missing, empty_dir, pages[1]], max_new_tokens=TOKENS)
    assert [page.file for page in reading.pages] == [str(pages[0]), str(pages[1])]
    assert sorted(f.file for f in reading.failed) == sorted(map(str, (corrupt, missing, empty_dir)))
    assert all(f.file in f.error for f in reading.failed)  # each message names its file
    assert all(f.file in caplog.text for f in reading.failed)
    assert reading.totals().items() >= {"pages_read": 2, "failed": 3, "files": 5}.items()


def test_pdf_pages_are_read(reader, pages, tmp_path):
    pytest.importorskip("pypdfium2")
    pdf = tmp_path / "doc.pdf"
    first, second = (Image.open(path).convert("RGB") for path in pages)
    first.save(pdf, save_all=True, append_images=[second])
    reading = read_files(reader, [pdf], batch_size=4, max_new_tokens=TOKENS)
    assert [(p.file, p.page, p.pages) for p in reading.pages] == [(str(pdf), 1, 2), (str(pdf), 2, 2)]
    assert not reading.failed
    assert page_header(reading.pages[1]) == f"==> {pdf} (page 2 of 2) <=="


def test_pdf_without_pypdfium2_names_the_file_and_the_fix(reader, pages, tmp_path, monkeypatch):
    pdf = tmp_path / "doc.pdf"
    Image.open(pages[0]).convert("RGB").save(pdf)
    monkeypatch.setitem(sys.modules, "pypdfium2", None)  # `import pypdfium2` now raises ImportError
    reading = read_files(reader, [pdf, pages[0]], max_new_tokens=TOKENS)
    assert [page.file for page in reading.pages] == [str(pages[0])]
    (failure,) = reading.failed
    assert failure.file == str(pdf) and str(pdf) in failure.error and "pip install pypdfium2" in failure.error


def test_cli_end_to_end(tiny_checkpoint, reader, pages, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    out = tmp_path / "out.json"
    args = ("--ckpt", str(tiny_checkpoint), "--device", "cpu", "--max-new-tokens", str(TOKENS))
    proc = run_cli("read.py", *args, *map(str, pages), str(corrupt), "--json", str(out), "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    expected = read_files(reader, pages, max_new_tokens=TOKENS)
    shown = "".join(f"{page_header(page)}\n{page.text}\n" for page in expected.pages)
    assert proc.stdout == shown
    assert str(corrupt) in proc.stderr
    record = json.loads(out.read_text())
    assert [(p["file"], p["page"], p["text"]) for p in record["pages"]] == [
        (page.file, page.page, page.text) for page in expected.pages
    ]
    assert all(isinstance(p["seconds"], float) and p["seconds"] > 0 for p in record["pages"])
    assert record["failed"][0]["file"] == str(corrupt)
    totals = record["totals"]
    assert totals["pages_read"] == 2 and totals["failed"] == 1 and totals["load_seconds"] > 0
    assert totals["seconds"] >= sum(p["seconds"] for p in record["pages"])
    assert record["checkpoint"] == str(tiny_checkpoint) and record["prompt"] == default_prompt(reader.cfg)


def test_cli_fails_only_when_nothing_is_read(tiny_checkpoint, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("read_cli", ROOT / "read.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    assert cli.main(["--ckpt", str(tiny_checkpoint), "--device", "cpu", str(corrupt), "--no-progress"]) == 1
    assert capsys.readouterr().out == ""
    assert cli.main(["--ckpt", str(tmp_path / "nope.ckpt"), str(corrupt)]) == 2
    assert "nope.ckpt" in capsys.readouterr().err
