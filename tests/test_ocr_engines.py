"""External OCR engines as a baseline arm (vlm.eval.ocr_engines), and eval.py scoring predictions without a
checkpoint, the split rebuilt from the data config. Engine tests run where the engine is installed."""

import json
import shlex
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from tests.conftest import TINY_DATA, run_cli
from tests.helpers import OCR_ENGINES_MISSING
from vlm.app.ocr_engines import main
from vlm.app.run import datamodule_without_checkpoint, evaluate_checkpoint
from vlm.config import add_data_settings, compose
from vlm.eval.benchmarks.base import Context
from vlm.eval.ocr_engines import EngineUnavailable, build_engine, reading_order


def eval_cfg(data_dir: Path, out: Path, *overrides: str):
    """eval.py's config on the tests' small rendered data, as its command line makes it."""
    base = [f"paths.data_dir={data_dir}", f"hydra.run.dir={out}", "logger=csv", *TINY_DATA]
    return compose("eval", add_data_settings([*base, *overrides]))


def test_synthetic_predictions_are_scored_without_a_checkpoint(data_dir, tmp_path):
    cfg = eval_cfg(data_dir, tmp_path / "items")
    items = instantiate(cfg.benchmark).items(Context(datamodule=datamodule_without_checkpoint(cfg)))
    assert len(items) == 16  # data.source.num_test of TINY_DATA: the split train.py renders
    predictions = {item.key: item.answers[0] if i % 2 else "" for i, item in enumerate(items)}
    (tmp_path / "predictions.json").write_text(json.dumps(predictions))

    metrics = evaluate_checkpoint(eval_cfg(data_dir, tmp_path / "eval", f"predictions={tmp_path}"))
    assert metrics["samples"] == 16 and metrics["exact_match"] == pytest.approx(0.5)
    assert (tmp_path / "eval" / "metrics.json").is_file()


def test_other_benchmarks_without_a_checkpoint_work_or_say_what_they_need(data_dir, tmp_path):
    sweep = ["benchmark=synthetic_compression", "benchmark.lengths=[16,32]", "benchmark.samples_per_length=2"]
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("")
    with pytest.raises(ValueError, match=r"needs benchmark.image_size=\[H,W\] without a checkpoint"):
        evaluate_checkpoint(eval_cfg(data_dir, tmp_path / "a", *sweep, f"predictions={predictions}"))
    metrics = evaluate_checkpoint(
        eval_cfg(
            data_dir, tmp_path / "b", *sweep, "benchmark.image_size=[32,512]", f"predictions={predictions}"
        )
    )
    assert metrics["samples"] == 4 and metrics["precision"] == 0  # no predictions: each scored empty
    with pytest.raises(ValueError, match="benchmark=longdoc needs ckpt_path"):
        evaluate_checkpoint(
            eval_cfg(data_dir, tmp_path / "c", "benchmark=longdoc", f"predictions={predictions}")
        )
    with pytest.raises(ValueError, match=r"data_config=nothing: .* options: .*synthetic"):
        evaluate_checkpoint(
            eval_cfg(data_dir, tmp_path / "d", "data_config=nothing", f"predictions={predictions}")
        )


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param(name, marks=pytest.mark.skipif(bool(why), reason=str(why)))
        for name, why in OCR_ENGINES_MISSING.items()
    ],
)
def test_engine_predictions_are_scored_by_the_printed_eval_command(engine, data_dir, tmp_path, capsys):
    overrides = [f"paths.data_dir={data_dir}", *TINY_DATA, "benchmark.limit=4"]
    written = main(["--engine", engine, f"hydra.run.dir={tmp_path / 'ocr'}", *overrides])
    assert written == tmp_path / "ocr" / "predictions" / "predictions.json"
    assert len(json.loads(written.read_text())) == 4
    printed = capsys.readouterr().out
    assert "ms per image" in printed
    timing = json.loads((written.parent / "timing.json").read_text())
    assert timing["engine"] == engine and timing["items"] == timing["read"] == 4
    assert timing["ms_per_image"] > 0 and f"{timing['ms_per_image']:.1f} ms per image" in printed
    command = shlex.split(printed.split("score them: ")[1].strip())
    assert command[:2] == ["python", "eval.py"] and f"predictions={written}" in command

    metrics = evaluate_checkpoint(
        compose("eval", add_data_settings([*command[2:], f"hydra.run.dir={tmp_path}"]))
    )
    assert metrics["samples"] == 4 and metrics["cer"] < 0.05  # clean rendered lines: both engines read them


def test_a_missing_engine_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no tesseract on it
    with pytest.raises(EngineUnavailable, match="apt-get install tesseract-ocr"):
        build_engine("tesseract")
    proc = run_cli("-m", "vlm.app.ocr_engines", "--engine", "tesseract")
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: no `tesseract` on PATH")
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # its import fails
    with pytest.raises(EngineUnavailable, match=r"pip install -e '\.\[ocr\]'"):
        build_engine("rapidocr")


@pytest.mark.skipif(bool(OCR_ENGINES_MISSING["tesseract"]), reason=str(OCR_ENGINES_MISSING["tesseract"]))
def test_tesseract_without_the_language_data_names_the_package():
    with pytest.raises(EngineUnavailable, match="apt-get install tesseract-ocr-xyz"):
        build_engine("tesseract", lang="eng+xyz")


def test_detected_boxes_are_joined_in_reading_order():
    def box(left, top, text):
        return [[(left, top), (left + 50, top), (left + 50, top + 20), (left, top + 20)], text, 0.9]

    detections = [box(100, 42, "line."), box(0, 2, "first"), box(0, 40, "second"), box(60, 0, "line")]
    assert reading_order(detections) == "first line\nsecond line."
    assert reading_order([]) == ""
