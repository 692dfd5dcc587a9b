"""python -m vlm.app.arms_table: the command of `vlm.eval.arms_table`, whose docstring is its manual."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from vlm.eval import arms_table
from vlm.eval.arms_table import named_path, write_table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vlm.app.arms_table", description=arms_table.__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "runs", nargs="+", help="multirun dirs, train.py or eval.py run dirs; NAME=DIR names a row"
    )
    parser.add_argument(
        "--out", type=Path, help="where arms.md, arms.json, arms.png go (default: the first run)"
    )
    args = parser.parse_args(argv)
    out_dir = args.out or named_path(args.runs[0])[1]
    write_table(args.runs, out_dir)
    print((out_dir / "arms.md").read_text() + f"-> {out_dir}/arms.md, arms.json, arms.png")


if __name__ == "__main__":
    main()
