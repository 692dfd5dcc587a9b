"""python -m vlm.app.synthetic [overrides]: write the shards of the built-in rendered-text data
(`data=synthetic`; `vlm.data.synthetic.RenderedShards`), e.g. `data.source.num_train=20000`."""

from __future__ import annotations

import logging
import sys


def write_shards(argv: list[str], data: str = "synthetic") -> None:
    """Write the shards of `data=<data>` (a config whose source is a RenderedShards) with overrides."""
    from hydra.utils import instantiate

    from vlm.config import compose

    logging.basicConfig(level=logging.INFO)
    # no run directory is made; `hydra.run.dir` would otherwise resolve paths before Hydra knows the cwd
    cfg = compose("train", [f"data={data}", "hydra.run.dir=.", *argv])
    source = instantiate(cfg.data.source)
    for split, shards in source.prepare().items():
        print(f"{split}: {len(shards)} shard(s) in {source.directory}")


def main(argv: list[str] | None = None) -> None:
    write_shards(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
