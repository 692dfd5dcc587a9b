"""Evaluate a checkpoint on a benchmark, or score given predictions (no checkpoint needed):
`python eval.py ckpt_path=PATH benchmark=synthetic`, `python eval.py predictions=PATH benchmark=synthetic`."""

import sys

import hydra
from omegaconf import DictConfig

from vlm.config import CONFIG_DIR, add_data_settings, finalize, quote_integer_options

sys.argv = [sys.argv[0], *add_data_settings(quote_integer_options(sys.argv[1:]))]


# the configs of the imported vlm package: the checkout's conf/, or its installed copy (vlm/config.py)
@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    from vlm.app.run import evaluate_checkpoint

    evaluate_checkpoint(finalize(cfg))


if __name__ == "__main__":
    main()
