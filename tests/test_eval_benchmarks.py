"""eval.py's benchmarks end to end: both modes (generate with a checkpoint, score given predictions),
the benchmarks' own prediction formats, the written files, and missing or unreadable items."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_cli
from tests.test_prepare import QUIET, make_coco, make_docvqa_release
from vlm.app.run import evaluate_checkpoint
from vlm.config import compose
from vlm.data.render import RenderStyle, render
from vlm.data.sources.coco import prepare_coco
from vlm.data.sources.docvqa import prepare_docvqa


def run_eval(out: Path, data_dir: Path, *overrides: str) -> tuple[dict, Path]:
    cfg = compose("eval", [f"paths.data_dir={data_dir}", f"hydra.run.dir={out}", "logger=csv", *overrides])
    return evaluate_checkpoint(cfg), out


def test_eval_needs_a_checkpoint_or_predictions(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"ckpt_path=PATH .* or predictions=DIR\|FILE"):
        run_eval(tmp_path, data_dir)
    with pytest.raises(FileNotFoundError, match=r"predictions=.*nothing-here"):
        run_eval(tmp_path, data_dir, f"predictions={tmp_path / 'nothing-here'}")


def test_synthetic_compression_writes_the_curve_in_both_modes(tiny_checkpoint, data_dir, tmp_path):
    sweep = [
        "benchmark=synthetic_compression",
        "benchmark.lengths=[16,48,96]",
        "benchmark.samples_per_length=3",
    ]
    metrics, out = run_eval(tmp_path / "gen", data_dir, f"ckpt_path={tiny_checkpoint}", *sweep)
    curve = json.loads((out / "tables.json").read_text())["curve"]
    assert [point["length"] for point in curve] == [16, 48, 96] and all(p["samples"] == 3 for p in curve)
    assert metrics["vision_tokens_per_image"] == 16
    names = [key.removeprefix("tokens_") for key in curve[0] if key.startswith("tokens_")]
    assert names[1:] == ["bytes", "gpt2"] and names[0].startswith("llm_")  # the model's, then the list
    for point in curve:  # compression_<name> = ground-truth tokens under <name> / vision tokens
        assert point["chars_per_vision_token"] == pytest.approx(point["chars"] / 16)
        for name in names:
            assert point[f"compression_{name}"] == pytest.approx(point[f"tokens_{name}"] / 16)
        assert point["tokens_gpt2"] < point["bytes"]  # BPE merges bytes
    assert curve[0]["compression_gpt2"] < curve[1]["compression_gpt2"] < curve[2]["compression_gpt2"]
    assert curve[2]["font_size"] < curve[0]["font_size"]  # longer text needs a smaller font to fit
    for name in names:
        assert (out / "plots" / f"precision_vs_compression_{name}.png").stat().st_size > 1000
    assert "## curve" in (out / "report.md").read_text()
    assert len((out / "samples.jsonl").read_text().splitlines()) == 9

    # scoring the written predictions again (here without the model: no vision tokens, curve over lengths)
    rescored, out2 = run_eval(
        tmp_path / "score",
        data_dir,
        f"predictions={out / 'predictions'}",
        *sweep,
        "benchmark.image_size=[32,512]",
    )
    assert rescored["precision"] == pytest.approx(metrics["precision"])
    assert rescored["cer"] == pytest.approx(metrics["cer"])
    point = json.loads((out2 / "tables.json").read_text())["curve"][0]
    assert "tokens_gpt2" in point and not [key for key in point if key.startswith("compression")]
    assert (out2 / "plots" / "precision_vs_length.png").is_file()


def test_synthetic_compression_lengths_follow_the_target_characters_per_vision_token(data_dir, tmp_path):
    """benchmark.chars_per_vision_token (the default): each length is target x vision tokens per image; a
    length no font size fits is reported; the plot carries DeepSeek-OCR's Fox points for reference."""
    from vlm.eval.benchmarks.synthetic import DEEPSEEK_OCR_FOX, SyntheticCompression

    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("")
    targets = [
        "benchmark=synthetic_compression",
        "benchmark.chars_per_vision_token=[1,2.5,25,1000]",
        "benchmark.samples_per_length=2",
        "benchmark.image_size=[32,512]",
        f"predictions={predictions}",
    ]
    with pytest.raises(ValueError, match=r"chars_per_vision_token needs the vision tokens per image"):
        run_eval(tmp_path / "a", data_dir, *targets)
    _, out = run_eval(tmp_path / "b", data_dir, *targets, "benchmark.vision_tokens=16")
    curve = json.loads((out / "tables.json").read_text())["curve"]
    assert [(p["length"], p["target_chars_per_vision_token"]) for p in curve] == [(16, 1), (40, 2.5)]
    assert all(p["chars_per_vision_token"] == pytest.approx(p["chars"] / 16) for p in curve)
    report = (out / "report.md").read_text()
    assert "lengths [400] fit the image at no font size" in report  # 32x512 at 8 px: three lines of ~100
    assert "lengths [16000]: the corpus's test split has too few snippets that long" in report
    assert (out / "plots" / "precision_vs_compression_gpt2.png").stat().st_size > 1000
    assert SyntheticCompression(lengths=[16, 48]).target_lengths(None) == {16: None, 48: None}
    assert all(0 < precision <= 1 for points in DEEPSEEK_OCR_FOX.values() for _, precision in points)


# ------------------------------------------------------------------------------------------ DocVQA
@pytest.fixture
def docvqa_shards(tmp_path) -> Path:
    make_docvqa_release(tmp_path / "raw")
    splits = {"val": tmp_path / "raw" / "train_v1.0.json", "test": tmp_path / "raw" / "test_v1.0.json"}
    prepare_docvqa(tmp_path / "docvqa", splits, samples_per_shard=2, **QUIET)
    return tmp_path / "docvqa"


def test_docvqa_anls_from_a_submission_file_and_missing_answers_count_empty(
    docvqa_shards, data_dir, tmp_path
):
    # val = the fixture's 3 good questions: 3 -> ["$1.00", "1 dollars"], 57 -> ["$0.00", "0 dollars"],
    # 1200 -> ["$2.00", "2 dollars"]
    submission = tmp_path / "submission.json"
    submission.write_text(
        json.dumps([{"questionId": 3, "answer": "$1.00"}, {"questionId": 57, "answer": "0  Dollars"}])
    )
    urls = f"benchmark.urls={docvqa_shards}/val/*.tar"
    metrics, out = run_eval(
        tmp_path / "eval", data_dir, "benchmark=docvqa", urls, f"predictions={submission}"
    )
    # q3 exact: 1; q57 after lowercasing and whitespace collapsing equal: 1; q1200 missing -> "": 0
    assert metrics["anls"] == pytest.approx(2 / 3) and metrics["questions"] == 3
    assert (
        "1 of 3 questions have no prediction and count as empty: docvqa-1200"
        in (out / "report.md").read_text()
    )
    by_key = {
        json.loads(line)["key"]: json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()
    }
    assert by_key["docvqa-1200"]["anls"] == 0.0 and by_key["docvqa-3"]["anls"] == 1.0


def test_docvqa_generation_writes_the_official_submission(tiny_checkpoint, docvqa_shards, data_dir, tmp_path):
    for split, ids in (("val", [3, 57, 1200]), ("test", [5])):
        metrics, out = run_eval(
            tmp_path / split,
            data_dir,
            "benchmark=docvqa",
            f"benchmark.urls={docvqa_shards}/{split}/*.tar",
            f"ckpt_path={tiny_checkpoint}",
            "benchmark.max_new_tokens=4",
        )
        rows = json.loads((out / "predictions" / "submission.json").read_text())
        assert [row["questionId"] for row in rows] == ids and all(isinstance(r["answer"], str) for r in rows)
        assert ("anls" in metrics) == (split == "val")  # the test split has no answers to score


# ------------------------------------------------------------------------------------------ COCO
def test_coco_captions_from_a_results_file_and_by_generation(tiny_checkpoint, data_dir, tmp_path):
    make_coco(tmp_path / "raw")
    prepare_coco(tmp_path / "coco", root=tmp_path / "raw", samples_per_shard=3, **QUIET)
    urls = f"benchmark.urls={tmp_path}/coco/val/*.tar"
    # the two val images (ids 1014 and 1007) have captions "A photo number {i}, caption {c}."
    perfect = [
        {"image_id": 1014, "caption": "A photo number 0, caption 1."},
        {"image_id": 1007, "caption": "a photo number 1 caption 2"},
    ]
    (tmp_path / "perfect.json").write_text(json.dumps(perfect))
    metrics, out = run_eval(
        tmp_path / "perfect", data_dir, "benchmark=coco", urls, f"predictions={tmp_path / 'perfect.json'}"
    )
    assert metrics["images"] == 2
    assert metrics["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and metrics["ROUGE-L"] == pytest.approx(1.0)
    assert "tokenisation" in (out / "report.md").read_text()
    wrong = [{"image_id": 1014, "caption": "a dog on a sofa"}, *perfect[1:]]
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    worse, _ = run_eval(
        tmp_path / "wrong", data_dir, "benchmark=coco", urls, f"predictions={tmp_path / 'wrong.json'}"
    )
    assert worse["BLEU-1"] < metrics["BLEU-1"] and worse["CIDEr-D"] < metrics["CIDEr-D"]

    generated, out = run_eval(
        tmp_path / "gen",
        data_dir,
        "benchmark=coco",
        urls,
        f"ckpt_path={tiny_checkpoint}",
        "benchmark.max_new_tokens=4",
    )
    rows = json.loads((out / "predictions" / "captions_results.json").read_text())
    assert sorted(row["image_id"] for row in rows) == [1007, 1014] and generated["images"] == 2


# ------------------------------------------------------------------------------------------ Fox
PAGES = {
    "en": [
        "the quick brown fox jumps over the lazy dog " * 3,
        "pack my box with five dozen liquor jugs",
        "hello world",
    ],
    "cn": ["今天天气很好我们去公园散步"],
}


def make_fox(root: Path) -> Path:
    """focus_benchmark_test/{en,cn}_page_ocr.json + {en,cn}_pdf_png/, as the Fox release lays it out."""
    for lang, texts in PAGES.items():
        (root / f"{lang}_pdf_png").mkdir(parents=True)
        entries = []
        for i, text in enumerate(texts, 1):
            render(text[:60], (64, 512), RenderStyle(None, 12)).save(
                root / f"{lang}_pdf_png" / f"{lang}_{i}.png"
            )
            human = "<image>\nOCR this image: " if lang == "en" else "<image>\n对图片进行OCR："
            entries.append(
                {
                    "image": f"{lang}_{i}.png",
                    "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": text}],
                }
            )
        (root / f"{lang}_page_ocr.json").write_text(json.dumps(entries, ensure_ascii=False))
    return root


def test_fox_official_prediction_format_languages_and_compression(tiny_checkpoint, data_dir, tmp_path):
    root = make_fox(tmp_path / "focus_benchmark_test")
    predictions = [
        {"image": "en_1.png", "lang": "en", "label": PAGES["en"][0], "answer": PAGES["en"][0]},
        {"image": "en_2.png", "lang": "en", "label": PAGES["en"][1], "answer": "pack my box"},
        {"image": "cn_1.png", "lang": "cn", "label": PAGES["cn"][0], "answer": PAGES["cn"][0]},
    ]  # en_3 has none: counts as empty
    (tmp_path / "fox.json").write_text(json.dumps(predictions, ensure_ascii=False))
    data = f"benchmark.data_dir={root}"
    metrics, out = run_eval(
        tmp_path / "score", data_dir, "benchmark=fox", data, f"predictions={tmp_path / 'fox.json'}"
    )
    assert metrics["pages"] == 4
    tables = json.loads((out / "tables.json").read_text())
    langs = {row["lang"]: row for row in tables["by_language"]}
    assert langs["en"]["pages"] == 3 and langs["cn"]["pages"] == 1 and langs["cn"]["precision"] == 1.0
    # en: page 1 perfect; page 2 has 3 of 8 words, all right: precision 1, recall 3/8; page 3 empty: 0, 0
    assert langs["en"]["precision"] == pytest.approx(2 / 3) and langs["en"]["recall"] == pytest.approx(
        (1 + 3 / 8) / 3
    )
    assert langs["en"]["precision_fox_official"] == pytest.approx(langs["en"]["recall"])
    assert "en/en_3" in (out / "report.md").read_text()
    assert not any(name.startswith("compression") for name in tables)  # no vision tokens

    # with the model: generation, its tokenizer and vision tokens give the compression study
    _, out = run_eval(
        tmp_path / "gen",
        data_dir,
        "benchmark=fox",
        data,
        f"ckpt_path={tiny_checkpoint}",
        "benchmark.max_new_tokens=4",
    )
    written = json.loads((out / "predictions" / "fox_predictions.json").read_text())
    assert {(r["lang"], r["image"]) for r in written} == {
        ("en", "en_1.png"),
        ("en", "en_2.png"),
        ("en", "en_3.png"),
        ("cn", "cn_1.png"),
    }
    assert all(r["label"] in PAGES[r["lang"]] for r in written)
    tables = json.loads((out / "tables.json").read_text())
    llm = next(name.removeprefix("compression_") for name in tables if name.startswith("compression_llm_"))
    assert {name for name in tables if name.startswith("compression_")} == {
        f"compression_{name}" for name in (llm, "bytes", "gpt2")
    }  # one study per tokenizer: the model's and the default list
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for name in (llm, "gpt2"):
        study = tables[f"compression_{name}"]
        assert sum(row["pages"] for row in study) == 3  # English pages only, as DeepSeek-OCR
        for row in study:
            start, end = map(int, row[f"tokens_{name}"].split("-"))
            members = [s for s in samples if s["lang"] == "en" and start <= s[f"tokens_{name}"] < end]
            assert row["pages"] == len(members)
            assert row[f"compression_{name}"] == pytest.approx(
                sum(s[f"tokens_{name}"] for s in members) / len(members) / 16
            )
            assert row["chars_per_vision_token"] == pytest.approx(
                sum(s["chars"] for s in members) / len(members) / 16
            )
        assert (out / "plots" / f"precision_vs_compression_{name}.png").is_file()


def test_an_unreadable_page_gets_no_prediction_and_is_reported(tiny_checkpoint, data_dir, tmp_path):
    root = make_fox(tmp_path / "focus_benchmark_test")
    (root / "en_pdf_png" / "en_2.png").write_bytes(b"\x89PNG broken")
    Image.new("RGB", (4, 4)).save(root / "en_pdf_png" / "unused.png")
    (root / "en_pdf_png" / "en_3.png").unlink()
    metrics, out = run_eval(
        tmp_path / "gen",
        data_dir,
        "benchmark=fox",
        f"benchmark.data_dir={root}",
        "benchmark.languages=[en]",
        f"ckpt_path={tiny_checkpoint}",
        "benchmark.max_new_tokens=4",
    )
    assert metrics["pages"] == 3
    written = json.loads((out / "predictions" / "fox_predictions.json").read_text())
    assert [r["image"] for r in written] == ["en_1.png"]
    assert (
        "2 of 3 pages have no prediction and count as empty: en/en_2, en/en_3"
        in (out / "report.md").read_text()
    )


# ------------------------------------------------------------------------------------------ OmniDocBench
# the real 18-page sample of the official repository; ../shared next to the repository
DEMO = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "omnidocbench_demo"
needs_demo = pytest.mark.skipif(not DEMO.is_dir(), reason=f"the OmniDocBench demo sample is not at {DEMO}")


@needs_demo
def test_omnidocbench_acceptance_command_reproduces_the_official_numbers(tmp_path):
    proc = run_cli(
        "eval.py",
        "benchmark=omnidocbench",
        f"predictions={DEMO / 'predictions'}",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    expected = json.loads((DEMO / "expected_official_v1.5.json").read_text())
    for name, value in expected.items():
        if isinstance(value, float):
            assert metrics[name] == pytest.approx(value, abs=0.005), name
    assert metrics["sample_counts"] == expected["sample_counts"]
    assert {p.name for p in (tmp_path / "plots").iterdir()} >= {"text_edit_by_language.png"}
    assert "## by data_source" in (tmp_path / "report.md").read_text()


@needs_demo
def test_omnidocbench_missing_pages_are_dropped_loudly_or_scored_empty(tmp_path, data_dir):
    predictions = tmp_path / "predictions"
    shutil.copytree(DEMO / "predictions", predictions)
    gone = sorted(predictions.glob("*.md"))[0]
    gone.unlink()
    gt = f"benchmark.gt={DEMO / 'OmniDocBench_demo.json'}"
    dropped, out = run_eval(
        tmp_path / "drop", data_dir, "benchmark=omnidocbench", gt, f"predictions={predictions}"
    )
    assert dropped["pages_scored"] == 17 and dropped["pages_missing"] == 1
    assert (
        f"1 of 18 pages have no prediction and were dropped from every metric (official): {gone.stem}"
        in (out / "report.md").read_text()
    )
    empty, _ = run_eval(
        tmp_path / "empty",
        data_dir,
        "benchmark=omnidocbench",
        gt,
        f"predictions={predictions}",
        "benchmark.missing=empty",
    )
    assert empty["pages_scored"] == 18
    assert empty["sample_counts"]["text_block"] > dropped["sample_counts"]["text_block"]
    assert empty["text_edit"] > dropped["text_edit"]  # the empty page's text scores edit distance 1


@needs_demo
def test_omnidocbench_generation_writes_one_markdown_file_per_page(tiny_checkpoint, data_dir, tmp_path):
    metrics, out = run_eval(
        tmp_path,
        data_dir,
        "benchmark=omnidocbench",
        f"benchmark.gt={DEMO / 'OmniDocBench_demo.json'}",
        f"ckpt_path={tiny_checkpoint}",
        "benchmark.limit=2",
        "benchmark.max_new_tokens=8",
    )
    written = sorted(p.stem for p in (out / "predictions").glob("*.md"))
    expected = sorted(
        Path(p["page_info"]["image_path"]).stem
        for p in json.loads((DEMO / "OmniDocBench_demo.json").read_text())[:2]
    )
    assert written == expected and metrics["pages_scored"] == 2


@needs_demo
def test_scores_tables_and_plots_reach_an_offline_wandb_run(tmp_path, data_dir):
    metrics, out = run_eval(
        tmp_path, data_dir, "benchmark=omnidocbench", f"predictions={DEMO / 'predictions'}", "logger=wandb"
    )
    assert metrics["text_edit"] > 0
    media = next((out / "wandb").glob("offline-run-*")) / "files" / "media"
    tables = sorted(p.name.split("_")[0] for p in (media / "table" / "eval").glob("*.table.json"))
    assert tables == ["by data", "by language", "by layout", "by special"]  # one per page attribute
    plots = sorted(p.name for p in (media / "images" / "eval").glob("*.png"))
    assert len(plots) == 3 and plots[0].startswith("text_edit_by_data_source")


def test_generation_prompts_carry_the_tiles_of_a_tiling_encoder():
    """DeepEncoder's gundam mode: a page gets a global view plus tiles, and the prompt one image token
    per position of both, exactly as in training."""
    from vlm.contracts import ImagePreprocessing, TiledViews, Tiling
    from vlm.data.processing import SampleProcessor
    from vlm.eval.benchmarks.base import Item
    from vlm.eval.runner import GenerationSet
    from vlm.models.llms.tokenizer import ByteTokenizer

    tokenizer = ByteTokenizer()
    prep = ImagePreprocessing(size=(64, 64), tiling=Tiling(tile_size=32, tokens_per_tile=(2, 2)))
    processor = SampleProcessor(tokenizer, prep, vision_tokens_per_image=5, train=False)
    sample = GenerationSet([Item("wide", Image.new("RGB", (90, 40)), "Read the page.")], processor)[0]
    pixels = sample["pixel_values"]
    assert isinstance(pixels, TiledViews) and len(pixels) == 1
    rows, cols = pixels.tile_grids[0]
    assert rows * cols > 1 and pixels.tiles.shape == (rows * cols, 3, 32, 32)
    image_tokens = sample["prompt_ids"].count(tokenizer.image_token_id)
    assert image_tokens == 5 + prep.tiling.local_positions((rows, cols))
