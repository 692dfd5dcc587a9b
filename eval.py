"""Evaluate a checkpoint on a benchmark: `python eval.py ckpt_path=PATH benchmark=synthetic`."""

import sys

import hydra
from omegaconf import DictConfig

from vlm.config import finalize, quote_integer_options


def add_data_settings(argv: list[str]) -> list[str]:
    """`data.<key>=VALUE` -> `++data.<key>=VALUE`: eval.yaml's `data` starts empty (the checkpoint's data
    config fills the rest), and Hydra adds keys to it only with `+`."""
    return [f"++{arg}" if arg.startswith("data.") and "=" in arg else arg for arg in argv]


sys.argv = [sys.argv[0], *add_data_settings(quote_integer_options(sys.argv[1:]))]


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from vlm.training.run import evaluate_checkpoint

    evaluate_checkpoint(finalize(cfg))


if __name__ == "__main__":
    main()
