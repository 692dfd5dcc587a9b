"""`python -m vlm.app.arms_table`: one table of a sweep's arms and OCR-engine runs, with 95% intervals."""

import json
import math
from pathlib import Path

import pytest
import yaml

from vlm.app.arms_table import main
from vlm.eval.arms_table import bootstrap_ratio, positions, wilson_interval, write_table
from vlm.eval.benchmarks.base import Context, Item
from vlm.eval.benchmarks.synthetic import SyntheticBenchmark
from vlm.eval.runner import write_result

SHARED = ["sizes=tiny", "trainer.max_steps=4", "logger=csv"]
REFERENCES = ["the cat sat", "on the mat", "a dog", "ran far away"]
CSV_HEADER = "epoch,eval/cer,perf/flops_per_step,perf/samples_per_s,perf/tflops_per_s,step,val/cer"


def write_eval(eval_dir: Path, predictions: list[str], vision_tokens: int | None, source: str) -> None:
    """metrics.json, samples.jsonl, report.md as the runner writes them for benchmark=synthetic."""
    items = [
        Item(f"test-{i:07d}", None, "<image>\nRead the text.", [text]) for i, text in enumerate(REFERENCES)
    ]
    benchmark = SyntheticBenchmark(tokenizers=["bytes"], vision_tokens=vision_tokens)
    result = benchmark.score(items, dict(zip([i.key for i in items], predictions, strict=True)), Context())
    result.metrics = {"benchmark": "synthetic", "predictions": source, **result.metrics}
    eval_dir.mkdir(parents=True)
    write_result(result, eval_dir, "synthetic")


def write_job(
    job_dir: Path, context: str, predictions: list[str] | None, perf: list[tuple[float, float]]
) -> None:
    """A train.py job of a multirun: .hydra/, csv/metrics.csv with perf/ windows, eval/ unless None."""
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"context={context}", *SHARED]))
    (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"context": {"name": context}}))
    (job_dir / "csv").mkdir()
    rows = [
        f",,{tflops * 1e12 / samples_per_s * 8},{samples_per_s},{tflops},{step},"
        for step, (samples_per_s, tflops) in enumerate(perf)
    ]
    (job_dir / "csv" / "metrics.csv").write_text("\n".join([CSV_HEADER, *rows, "0,,,,,3,0.9"]) + "\n")
    if predictions is not None:
        write_eval(job_dir / "eval", predictions, 4, "generated")


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Three arms, the third failed before its eval; and an eval.py run of Tesseract's predictions."""
    multirun = tmp_path / "multiruns" / "2026-12-06_12-00-00"
    multirun.mkdir(parents=True)
    (multirun / "multirun.yaml").write_text("hydra: {}\n")
    write_job(
        multirun / "0",
        "vision",
        ["the cat sat", "on the hat", "a dog", "ran"],
        [(100.0, 0.01), (200.0, 0.03)],
    )
    write_job(
        multirun / "1", "text_conv", ["the cat sat", "on the mat", "a dog", "ran far away"], [(50.0, 0.01)]
    )
    write_job(multirun / "2", "truncate", None, [])
    timed = multirun / "1" / "eval" / "metrics.json"  # generation time, where the runner records it
    timed.write_text(json.dumps(json.loads(timed.read_text()) | {"generation_ms_per_item": 12.5}))
    tesseract = "/logs/ocr_tesseract/runs/2026-12-06_13-00-00/predictions/predictions.jsonl"
    write_eval(tmp_path / "eval_run", ["the cat sat", "on the mat", "a dog", "ran far"], None, tesseract)
    return multirun


def test_wilson_interval_matches_the_hand_computed_one():
    # 8 of 10: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10) = 0.7167, half-width
    # 1.96 sqrt(0.8 * 0.2 / 10 + 1.96^2 / 400) / (1 + 1.96^2/10) = 0.2266
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 16) == pytest.approx((0.0, 1.96**2 / (16 + 1.96**2)), abs=1e-4)
    assert wilson_interval(16, 16)[1] == 1.0
    assert all(math.isnan(bound) for bound in wilson_interval(0, 0))


def test_bootstrap_interval_brackets_the_ratio_and_is_reproducible():
    edits, lengths = [0, 1, 5, 2, 0, 9], [10, 10, 12, 8, 10, 11]
    low, high = bootstrap_ratio(edits, lengths)
    assert low < sum(edits) / sum(lengths) < high
    assert (low, high) == bootstrap_ratio(edits, lengths)
    assert bootstrap_ratio([1, 2, 3], [10, 20, 30]) == pytest.approx((0.1, 0.1))


def test_full_text_takes_as_many_positions_as_its_llm_tokens():
    metrics = {"vision_tokens_per_image": 16, "mean_tokens_llm_bytes": 43.5, "mean_tokens_gpt2": 9.2}
    assert positions(metrics, "truncate") == 16
    assert positions(metrics, "full_text") == 43.5


def test_the_table_has_a_row_per_arm_and_engine_with_intervals_and_costs(sweep, tmp_path):
    rows = write_table([str(sweep), str(tmp_path / "eval_run")], tmp_path / "out")
    by_arm = {row["arm"]: row for row in rows}
    assert list(by_arm) == ["context=vision", "context=text_conv", "context=truncate", "tesseract"]

    vision = by_arm["context=vision"]
    metrics = json.loads((sweep / "0" / "eval" / "metrics.json").read_text())
    assert vision["cer"] == pytest.approx(metrics["cer"])  # the corpus CER the runner reports
    assert vision["wer"] == pytest.approx(metrics["wer"])
    assert vision["exact_match"] == metrics["exact_match"] == 0.5
    assert (vision["exact_match_low"], vision["exact_match_high"]) == pytest.approx(wilson_interval(2, 4))
    assert vision["cer_low"] <= vision["cer"] <= vision["cer_high"]
    assert vision["positions"] == 4
    assert vision["chars_per_vision_token"] == metrics["chars_per_vision_token"]
    assert vision["compression_bytes"] == metrics["compression_bytes"]
    # GFLOPs per sample: 1e3 * tflops_per_s / samples_per_s per window (0.1, 0.15), median 0.125
    assert vision["train_gflops_per_sample"] == pytest.approx(0.125)
    assert vision["train_ms_per_sample"] == pytest.approx(7.5)  # 1000 / samples_per_s: 10, 5

    assert by_arm["context=text_conv"]["cer"] == 0.0
    assert by_arm["context=text_conv"]["exact_match"] == 1.0
    assert by_arm["context=text_conv"]["generate_ms_per_item"] == 12.5
    assert "generate_ms_per_item" not in vision
    assert by_arm["context=truncate"]["status"] == "no eval"
    assert "metrics.json missing" in by_arm["context=truncate"]["reason"]
    engine = by_arm["tesseract"]
    assert engine["positions"] is None and "compression_bytes" not in engine
    assert "train_ms_per_sample" not in engine

    table = (tmp_path / "out" / "arms.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| arm"))
    assert header.split(" | ")[2:5] == ["samples", "cer", "wer"]
    assert "compression_bytes" in header and "train_gflops_per_sample" in header
    assert f"| 0.500 [{vision['exact_match_low']:.3f}, {vision['exact_match_high']:.3f}] |" in table
    assert "| context=truncate | no eval | – |" in table
    assert (tmp_path / "out" / "arms.png").stat().st_size > 0
    written = json.loads((tmp_path / "out" / "arms.json").read_text())
    assert [row["arm"] for row in written] == list(by_arm)


def test_the_command_names_rows_and_writes_next_to_the_sweep(sweep, tmp_path, capsys):
    main([str(sweep), f"rapid={tmp_path / 'eval_run'}"])
    assert "| rapid | ok |" in capsys.readouterr().out
    assert {"arms.md", "arms.json", "arms.png"} <= {p.name for p in sweep.iterdir()}
    with pytest.raises(FileNotFoundError, match="no such directory"):
        main([str(tmp_path / "missing")])


def test_an_engine_row_takes_its_reading_time_from_the_timing_file(tmp_path):
    """`vlm.eval.ocr_engines` writes timing.json beside its predictions; the engine's row shows it, and a
    missing, damaged or absurd file leaves the column empty instead of failing the table."""
    predictions = tmp_path / "ocr_rapidocr" / "runs" / "t" / "predictions" / "predictions.json"
    predictions.parent.mkdir(parents=True)
    write_eval(tmp_path / "eval_run", REFERENCES, None, str(predictions))
    assert "generate_ms_per_item" not in write_table([str(tmp_path / "eval_run")], tmp_path / "a")[0]
    timing = predictions.parent / "timing.json"
    for content, expected in [
        ('{"engine": "rapidocr", "ms_per_image": 41.5}', 41.5),
        ('{"ms_per_image": "fast"}', None),
        ('{"ms_per_image": NaN}', None),
        ("[1, 2", None),
        ("[]", None),
    ]:
        timing.write_text(content)
        row = write_table([str(tmp_path / "eval_run")], tmp_path / "b")[0]
        assert row["arm"] == "rapidocr" and row.get("generate_ms_per_item") == expected, content
