"""Evaluate a checkpoint on a benchmark: `python eval.py ckpt_path=PATH benchmark=synthetic`."""

import sys

import hydra
from omegaconf import DictConfig

from vlm.config import finalize, quote_integer_options

sys.argv = [sys.argv[0], *quote_integer_options(sys.argv[1:])]


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from vlm.training.run import evaluate_checkpoint

    evaluate_checkpoint(finalize(cfg))


if __name__ == "__main__":
    main()
