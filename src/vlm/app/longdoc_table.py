"""python -m vlm.app.longdoc_table: the command of `vlm.eval.longdoc_table`, whose docstring is its manual."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from vlm.eval import longdoc_table
from vlm.eval.arms_table import named_path
from vlm.eval.longdoc_table import OUTPUT, write_table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vlm.app.longdoc_table", description=longdoc_table.__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "runs",
        nargs="+",
        help="multirun dirs, train.py or eval.py run dirs of benchmark=longdoc; NAME=DIR names an arm",
    )
    parser.add_argument(
        "--out", type=Path, help=f"where {OUTPUT}.md, .json, .png go (default: the first run)"
    )
    args = parser.parse_args(argv)
    out_dir = args.out or named_path(args.runs[0])[1]
    write_table(args.runs, out_dir)
    print((out_dir / f"{OUTPUT}.md").read_text() + f"-> {out_dir}/{OUTPUT}.md, .json, .png")


if __name__ == "__main__":
    main()
