"""python -m vlm.bench generate [--batch 8 --new-tokens 256 ...]"""

import argparse

from vlm.bench import generation


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m vlm.bench", description=__doc__)
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)
    generation.add_arguments(benchmarks.add_parser("generate", help=generation.__doc__.splitlines()[0]))
    args = parser.parse_args()
    {"generate": generation.run}[args.benchmark](args)


if __name__ == "__main__":
    main()
