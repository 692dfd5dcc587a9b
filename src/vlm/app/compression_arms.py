"""python -m vlm.app.compression_arms: the command of `vlm.eval.compression_arms`, whose docstring is its manual."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from vlm.eval import compression_arms
from vlm.eval.arms_table import named_path
from vlm.eval.compression_arms import BENCHMARK, markdown, tokenizers, write_merged


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vlm.app.compression_arms", description=compression_arms.__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "runs",
        nargs="+",
        help=f"eval.py run dirs of benchmark={BENCHMARK} (or multirun dirs); NAME=DIR names one",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where the table and plots go (default: the first run's parent dir, or it if a multirun dir)",
    )
    args = parser.parse_args(argv)
    first = named_path(args.runs[0])[1].resolve()
    out_dir = args.out or (first if (first / "multirun.yaml").is_file() else first.parent)
    rows = write_merged(args.runs, out_dir)
    plots = ", ".join(f"precision_vs_compression_{name}.png" for name in tokenizers(rows))
    print(markdown(rows) + f"-> {out_dir}: compression_arms.md, compression_arms.json, {plots}")


if __name__ == "__main__":
    main()
