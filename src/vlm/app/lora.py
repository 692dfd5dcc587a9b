"""python -m vlm.app.lora merge <in.ckpt> <out.ckpt>: a checkpoint with its LoRA adapters merged into
their base weights (and `lora.r = 0` in its config), which `eval.py ckpt_path=<out.ckpt>` loads like any
other (`vlm.models.llms.lora`)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from vlm.training.checkpointing import merge_lora_checkpoint


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlm.app.lora", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="write a checkpoint with the adapters merged")
    merge.add_argument("source")
    merge.add_argument("target")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    merge_lora_checkpoint(args.source, args.target)


if __name__ == "__main__":
    main()
