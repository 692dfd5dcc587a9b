"""python -m vlm.app.bench generate [--batch 8 --new-tokens 256 ...] | data [--samples 2000] [overrides]
| train [--batch 4 --steps 3 ...] [--config overrides] | gpu [--only train|generate|fsdp] [--out FILE]"""

from __future__ import annotations

import argparse

from vlm.bench import data, generation, gpu, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlm.app.bench", description=__doc__)
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)
    generation.add_arguments(benchmarks.add_parser("generate", help=generation.__doc__.splitlines()[0]))
    data.add_arguments(benchmarks.add_parser("data", help=data.__doc__.splitlines()[0]))
    train.add_arguments(benchmarks.add_parser("train", help=train.__doc__.splitlines()[0]))
    gpu.add_arguments(benchmarks.add_parser("gpu", help=gpu.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    {"generate": generation.run, "data": data.run, "train": train.run, "gpu": gpu.run}[args.benchmark](args)


if __name__ == "__main__":
    main()
