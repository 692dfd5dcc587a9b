"""Train a vision-language model: `python train.py [group=option ...] [key=value ...]`."""

import sys

import hydra
from omegaconf import DictConfig

from vlm.config import finalize, quote_integer_options

sys.argv = [sys.argv[0], *quote_integer_options(sys.argv[1:])]


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from vlm.training.run import train

    metrics = train(finalize(cfg))
    return metrics.get("eval/cer", metrics.get("val/cer"))


if __name__ == "__main__":
    main()
