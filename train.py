"""Train a vision-language model: `python train.py [group=option ...] [key=value ...]`."""

import sys

import hydra
from omegaconf import DictConfig

from vlm.config import CONFIG_DIR, finalize, optimized_metric, quote_integer_options, sweep_job

sys.argv = [sys.argv[0], *quote_integer_options(sys.argv[1:])]


# the configs of the imported vlm package: the checkout's conf/, or its installed copy (vlm/config.py)
@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns `optimized_metric` for a sweeper (conf/hparams_search/)."""
    from vlm.app.run import train

    with sweep_job():
        metrics = train(finalize(cfg))
    return optimized_metric(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
