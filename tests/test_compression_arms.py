"""`python -m vlm.app.compression_arms`: benchmark=synthetic_compression runs of several arms merged into one
table per (arm, point) and one plot per tokenizer."""

import json
import statistics
from pathlib import Path

import pytest
import yaml
from matplotlib.figure import Figure

from vlm.app.compression_arms import main
from vlm.app.run import evaluate_checkpoint
from vlm.config import compose
from vlm.eval.arms_table import bootstrap_ratio
from vlm.eval.benchmarks.base import Context, Item
from vlm.eval.benchmarks.synthetic import FOX_REFERENCE, SyntheticCompression
from vlm.eval.compression_arms import write_merged
from vlm.eval.runner import write_result

VISION_TOKENS = 4
# length (characters) -> ground truths; 12 and 24 characters are 3 and 6 per vision token at K = 4
TEXTS = {12: ["the cat sat", "a red fox"], 24: ["the dog ran far away", "on the mat today"]}
TESSERACT = "/logs/ocr_tesseract/runs/t/predictions/predictions.jsonl"


class WordTokenizer:
    """A model tokenizer stand-in: one token per word (counted as `llm_words`)."""

    name = "words"

    def encode(self, text: str) -> list[str]:
        return text.split()


class CharacterTokenizer(WordTokenizer):
    """Another tokenizer under the same name: one token per character."""

    def encode(self, text: str) -> list[str]:
        return list(text)


def write_run(
    run_dir: Path,
    predictions: dict[int, list[str]],
    vision_tokens: int | None = VISION_TOKENS,
    tokenizer=None,
    source: str = "generated",
    answers: dict[int, list[str]] = TEXTS,
) -> None:
    """An eval.py run dir of benchmark=synthetic_compression, its files written as the runner writes them."""
    items = [
        Item(
            f"len{length:04d}-{i:04d}",
            None,
            "<image>\nRead the text.",
            [text],
            {"task": "ocr", "length": length, "font_size": 12, "chars": len(text)}
            | ({"target_chars_per_vision_token": length / vision_tokens} if vision_tokens else {}),
        )
        for length in predictions
        for i, text in enumerate(answers[length])
    ]
    texts = {
        item.key: text
        for item, text in zip(items, [t for ts in predictions.values() for t in ts], strict=True)
    }
    benchmark = SyntheticCompression(tokenizers=["bytes", "gpt2"], vision_tokens=vision_tokens)
    result = benchmark.score(items, texts, Context(tokenizer=tokenizer))
    result.metrics = {"benchmark": "synthetic_compression", "predictions": source, **result.metrics}
    result.plots = {}  # the merge reads none of a run's plots; drawing them would only cost time
    run_dir.mkdir(parents=True)
    write_result(result, run_dir, "synthetic_compression")


@pytest.fixture
def runs(tmp_path) -> dict[str, Path]:
    """A checkpoint arm, Tesseract's predictions (no model tokenizer), an engine scored without K, a run that
    failed before scoring and a run of another benchmark."""
    runs = {name: tmp_path / "runs" / name for name in ("vision", "engine", "no_k", "failed", "other")}
    vision = {12: ["the cat sat", "a red fox"], 24: ["the dog ran", "on a hat"]}
    write_run(runs["vision"], vision, tokenizer=WordTokenizer())
    write_run(runs["engine"], {length: list(texts) for length, texts in TEXTS.items()}, source=TESSERACT)
    write_run(runs["no_k"], {12: ["the dog", "a red fox"]}, vision_tokens=None, source=TESSERACT)
    (runs["failed"] / ".hydra").mkdir(parents=True)
    runs["other"].mkdir()
    (runs["other"] / "metrics.json").write_text(json.dumps({"benchmark": "synthetic", "cer": 0.1}))
    return runs


def test_a_row_per_arm_and_point_with_the_curves_arithmetic_and_bootstrap_intervals(runs, tmp_path):
    arguments = [str(runs["vision"]), f"tess={runs['engine']}", str(runs["failed"])]
    rows = write_merged(arguments, tmp_path / "out")
    assert [(row["arm"], row.get("length")) for row in rows] == [
        ("vision", 12),
        ("vision", 24),
        ("tess", 12),
        ("tess", 24),
        ("failed", None),
    ]
    vision_short, vision_long, _, engine_long, failed = rows
    # mean characters (words) / K: (11 + 9) / 2 / 4 and (20 + 16) / 2 / 4; words (3 + 3) / 2 / 4, (5 + 4) / 2 / 4
    assert (vision_short["chars_per_vision_token"], vision_long["chars_per_vision_token"]) == (2.5, 4.5)
    assert (vision_short["compression_llm_words"], vision_long["compression_llm_words"]) == (0.75, 1.125)
    assert vision_short["target"] == 3 and vision_long["target"] == 6
    # word-set precision: "the dog ran" 3/3, "on a hat" 1/3 ("on" only)
    assert vision_long["precision"] == pytest.approx(2 / 3)
    assert vision_short["precision"] == 1.0 and vision_short["precision_low"] == 1.0
    samples = [json.loads(line) for line in (runs["vision"] / "samples.jsonl").read_text().splitlines()]
    long_ned = [s["one_minus_ned"] for s in samples if s["length"] == 24]
    assert vision_long["one_minus_ned"] == pytest.approx(statistics.fmean(long_ned))
    assert (vision_long["one_minus_ned_low"], vision_long["one_minus_ned_high"]) == pytest.approx(
        bootstrap_ratio(long_ned, [1.0, 1.0])
    )
    assert vision_long["precision_low"] < vision_long["precision"] < vision_long["precision_high"]
    curve = json.loads((runs["vision"] / "tables.json").read_text())["curve"]  # the runner's own curve
    for row, point in zip((vision_short, vision_long), curve, strict=True):
        for key in (
            "chars_per_vision_token",
            "compression_gpt2",
            "compression_bytes",
            "precision",
            "one_minus_ned",
        ):
            assert row[key] == pytest.approx(point[key]), key
        assert row["samples"] == point["samples"] == 2

    # the engine counted no model tokenizer: the same ground truths' counts come from the vision run
    assert engine_long["compression_llm_words"] == vision_long["compression_llm_words"]
    assert engine_long["counts_from_other_runs"] == ["llm_words"]
    assert "counts_from_other_runs" not in vision_long
    assert engine_long["compression_gpt2"] == vision_long["compression_gpt2"]
    assert engine_long["precision"] == engine_long["precision_high"] == 1.0
    assert failed["status"] == "no eval" and "metrics.json missing" in failed["reason"]

    table = (tmp_path / "out" / "compression_arms.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| arm"))
    assert header.split(" | ")[2:6] == [
        "target chars/vision token",
        "chars/vision token",
        "compression_gpt2",
        "compression_llm_words",
    ]
    bounds = f"[{vision_long['precision_low']:.3f}, {vision_long['precision_high']:.3f}]"
    assert (
        f"| vision | ok | 6 | 4.50 | {vision_long['compression_gpt2']:.2f} | 1.12 | 4.50 | 0.667 {bounds} |"
        in table
    )
    assert "| failed | no eval | – | – |" in table
    assert "- tess: tokens under llm_words counted by other runs on the same ground-truth texts" in table
    written = json.loads((tmp_path / "out" / "compression_arms.json").read_text())
    assert [row["arm"] for row in written] == [row["arm"] for row in rows]
    assert written[1]["precision_low"] == vision_long["precision_low"]


def test_runs_without_results_or_vision_tokens_are_reported(runs, tmp_path):
    rows = write_merged([str(runs[name]) for name in ("other", "no_k", "vision")], tmp_path / "out")
    other, no_k = rows[0], rows[1]
    assert (
        other["status"] == "other benchmark"
        and "benchmark=synthetic, not synthetic_compression" in other["reason"]
    )
    assert no_k["arm"] == "tesseract"  # named by the engine in its predictions' path
    assert not [key for key in no_k if key.startswith(("compression_", "chars_per"))]
    assert no_k["precision"] == 0.75  # "the dog" 1/2 ("the"), "a red fox" 3/3
    table = (tmp_path / "out" / "compression_arms.md").read_text()
    assert "- tesseract: no vision tokens per image, so on no compression plot" in table
    assert "| other | other benchmark |" in table
    with pytest.raises(FileNotFoundError, match="no such directory"):
        write_merged([str(tmp_path / "nothing-here")], tmp_path / "out")


def test_counts_are_borrowed_only_for_the_same_texts_from_runs_that_agree(runs, tmp_path):
    other_texts = {12: ["one two three", "four five"]}
    write_run(tmp_path / "ocr_rapidocr", other_texts, source=TESSERACT, answers=other_texts)
    rows = write_merged([str(runs["vision"]), str(tmp_path / "ocr_rapidocr")], tmp_path / "a")
    assert "compression_llm_words" not in rows[2] and "counts_from_other_runs" not in rows[2]
    assert rows[2]["compression_gpt2"] > 0  # what the run counted itself

    # two tokenizers under one name disagree on the texts: the engine gets neither's counts
    write_run(tmp_path / "chars", {12: ["the cat sat", "a red fox"]}, tokenizer=CharacterTokenizer())
    rows = write_merged([str(runs["engine"]), str(runs["vision"]), str(tmp_path / "chars")], tmp_path / "b")
    engine, vision, chars = rows[0], rows[2], rows[4]
    assert "compression_llm_words" not in engine and "counts_from_other_runs" not in engine
    assert (vision["compression_llm_words"], chars["compression_llm_words"]) == (0.75, 2.5)  # their own


def test_one_plot_per_tokenizer_with_every_arm_and_the_fox_points(runs, tmp_path, monkeypatch):
    drawn: dict[str, tuple[list[str], int]] = {}
    save = Figure.savefig

    def record(figure, path, *args, **kwargs):
        axes = figure.axes[0]
        drawn[Path(path).name] = (axes.get_legend_handles_labels()[1], len(axes.containers))
        return save(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    arguments = [str(runs[name]) for name in ("vision", "engine", "no_k", "failed")]
    write_merged(arguments, tmp_path / "out")
    names = ["gpt2", "llm_words", "bytes"]
    assert sorted(drawn) == sorted(f"precision_vs_compression_{name}.png" for name in names)
    arms = [f"{arm}: {score}" for arm in ("vision", "tesseract") for score in ("precision", "one_minus_ned")]
    for name in names:
        labels, error_bars = drawn[f"precision_vs_compression_{name}.png"]
        assert sorted(labels) == sorted([*arms, *FOX_REFERENCE]), (
            name
        )  # the arm without K and the failed run on none
        assert error_bars == 4
        assert (tmp_path / "out" / f"precision_vs_compression_{name}.png").stat().st_size > 1000


def test_arms_are_named_by_name_engine_dir_or_their_multirun_overrides(runs, tmp_path, capsys):
    sweep = tmp_path / "multirun"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for job, checkpoint in enumerate(["a.ckpt", "b.ckpt"]):
        write_run(sweep / str(job), {12: ["the cat sat", "a red fox"]}, tokenizer=WordTokenizer())
        overrides = ["benchmark=synthetic_compression", f"ckpt_path={checkpoint}"]
        (sweep / str(job) / ".hydra").mkdir()
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    main([str(sweep), str(runs["engine"]), f"mine={runs['vision']}"])
    printed = capsys.readouterr().out
    for arm in ("ckpt_path=a.ckpt", "ckpt_path=b.ckpt", "tesseract", "mine"):
        assert f"| {arm} | ok |" in printed
    assert "precision_vs_compression_gpt2.png" in printed
    assert (sweep / "compression_arms.md").is_file()  # default --out: the multirun dir given first
    main([str(runs["vision"])])
    assert (runs["vision"].parent / "compression_arms.md").is_file()  # else the first run's parent


def test_the_real_eval_of_a_checkpoint_and_its_predictions_as_an_engine_merge(
    tiny_checkpoint, data_dir, tmp_path
):
    """eval.py on a tiny checkpoint, and the same predictions scored without it as an OCR engine's are (K from
    benchmark.vision_tokens): the two arms agree on every point."""

    def run_eval(out: Path, *overrides: str) -> None:
        base = [f"paths.data_dir={data_dir}", f"hydra.run.dir={out}", "logger=csv"]
        evaluate_checkpoint(compose("eval", [*base, "benchmark=synthetic_compression", *overrides]))

    sweep = ["benchmark.chars_per_vision_token=[1,2]", "benchmark.samples_per_length=2"]
    run_eval(tmp_path / "model", f"ckpt_path={tiny_checkpoint}", *sweep)
    predictions = tmp_path / "ocr_rapidocr" / "predictions.jsonl"
    predictions.parent.mkdir()
    predictions.write_bytes((tmp_path / "model" / "predictions" / "predictions.jsonl").read_bytes())
    items = ["benchmark.image_size=[32,512]", "benchmark.vision_tokens=16"]
    run_eval(tmp_path / "engine", f"predictions={predictions}", *sweep, *items)

    rows = write_merged([str(tmp_path / "model"), str(tmp_path / "engine")], tmp_path / "out")
    model, engine = rows[:2], rows[2:]
    assert [(row["arm"], row["length"], row["target"]) for row in rows] == [
        ("model", 16, 1),
        ("model", 32, 2),
        ("rapidocr", 16, 1),
        ("rapidocr", 32, 2),
    ]
    llm = next(key for key in model[0] if key.startswith("compression_llm_"))
    for ours, theirs in zip(model, engine, strict=True):
        assert ours["vision_tokens_per_image"] == theirs["vision_tokens_per_image"] == 16
        for key in (
            "chars_per_vision_token",
            "compression_gpt2",
            llm,
            "precision",
            "precision_low",
            "samples",
        ):
            assert ours[key] == pytest.approx(theirs[key]), key
    assert engine[0]["counts_from_other_runs"] == [llm.removeprefix("compression_")]
    assert len(list((tmp_path / "out").glob("precision_vs_compression_*.png"))) == 3
