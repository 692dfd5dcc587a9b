"""python -m vlm.app.prepare <source> ...: official raw dataset layouts -> webdataset shards
(`vlm.data.prepare`, whose docstring is this command's manual)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vlm.data import prepare
from vlm.data.prepare import SOURCES, PrepareError, summary


def build_parser() -> argparse.ArgumentParser:
    from importlib import import_module

    from vlm.data.sources import add_common_arguments

    parser = argparse.ArgumentParser(
        prog="python -m vlm.app.prepare",
        description=prepare.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="source", required=True, metavar="{" + ",".join(SOURCES) + "}")
    for name in SOURCES:
        module = import_module(f"vlm.data.sources.{name}")
        command = sub.add_parser(
            name,
            help=module.__doc__.strip().splitlines()[0],
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
        add_common_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        index = args.run(args)
    except (PrepareError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(index, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
