"""python -m vlm.app.ocr_engines --engine tesseract|rapidocr [eval.py overrides]: an OCR engine's
predictions on a benchmark's items, to score with eval.py (`vlm.eval.ocr_engines`, whose docstring is
this command's manual)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from vlm.eval import ocr_engines
from vlm.eval.ocr_engines import ENGINES, TIMING_FILE, EngineUnavailable, build_engine, read_items


def main(argv: list[str] | None = None) -> Path:
    """Run the engine over the benchmark's items; returns the predictions written."""
    parser = argparse.ArgumentParser(
        prog="python -m vlm.app.ocr_engines", description=ocr_engines.__doc__.split("\n\n")[0]
    )
    parser.add_argument("--engine", choices=list(ENGINES), required=True)
    parser.add_argument(
        "--psm",
        type=int,
        default=7,
        help="Tesseract page segmentation: 7 one line (default), 6 a block, 3 a page",
    )
    parser.add_argument("--lang", default="eng", help="Tesseract languages, e.g. eng+chi_sim")
    parser.add_argument("--out", type=Path, help="predictions folder (default: the run dir's predictions/)")
    parser.add_argument("overrides", nargs="*", help="eval.py overrides: benchmark=NAME, data.KEY=VALUE, ...")
    args = parser.parse_args(argv)

    engine = build_engine(args.engine, args.psm, args.lang)
    from hydra.utils import instantiate  # after the engine check: these take seconds (torch, Lightning)

    from vlm.app.run import datamodule_without_checkpoint
    from vlm.config import add_data_settings, compose
    from vlm.eval.benchmarks.base import Context

    cfg = compose("eval", [f"task_name=ocr_{args.engine}", *add_data_settings(args.overrides)])
    benchmark = instantiate(cfg.benchmark)
    items = benchmark.items(Context(datamodule=datamodule_without_checkpoint(cfg)))
    if not items:
        raise ValueError(f"benchmark={benchmark.name} has no items")
    print(f"{engine.version} ({engine.settings}) on {len(items)} items of benchmark={benchmark.name}")
    predictions, seconds_per_image = read_items(engine, items)
    out = args.out or Path(cfg.paths.output_dir) / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    written = benchmark.write_predictions(items, predictions, out)
    timing = {
        "engine": args.engine,
        "version": engine.version,
        "settings": engine.settings,
        "items": len(items),
        "read": len(predictions),
        "ms_per_image": 1000 * seconds_per_image,
    }
    (out / TIMING_FILE).write_text(json.dumps(timing, indent=2))
    kept = [arg for arg in args.overrides if not arg.startswith(("hydra.", "task_name="))]
    score = shlex.join(["python", "eval.py", *kept, f"predictions={written}"])
    print(
        f"{len(predictions)} of {len(items)} items read, {1000 * seconds_per_image:.1f} ms per image "
        f"-> {written}\nscore them: {score}"
    )
    return written


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except EngineUnavailable as error:
        sys.exit(f"error: {error}")
