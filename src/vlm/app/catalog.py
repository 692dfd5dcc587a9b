"""docs/usage.md's table of vision tokens per image for every encoder x resampler option at its defaults.

    python -m vlm.app.catalog

Each encoder is built at its configured (official) size on the meta device, so no weights are
allocated or downloaded, and each resampler at its config group's defaults; the counts are the
model's own `vision_tokens_per_image`, never typed.
"""

from __future__ import annotations

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from vlm.config import CONFIG_DIR, compose
from vlm.models.vlm import CompositionError

ENCODERS = ("tiny", "siglip", "blip2", "deepencoder")
RESAMPLERS = ("identity", "pixel_shuffle", "avgpool", "perceiver")


def resampler_label(option: str, cfg) -> str:
    knobs = {"pixel_shuffle": "factor", "avgpool": "tokens", "perceiver": "num_queries"}
    return (
        f"`{option}` ({knobs[option]} {cfg.resampler[knobs[option]]})" if option in knobs else f"`{option}`"
    )


def token_table() -> str:
    """Markdown: one row per encoder, one column per resampler, cells = vision tokens x width."""
    header, rows = None, []
    for encoder in ENCODERS:
        cells = []
        labels = []
        for resampler in RESAMPLERS:
            overrides = [f"encoder={encoder}", f"resampler={resampler}", "hydra.run.dir=."]
            if "pretrained" in (CONFIG_DIR / "encoder" / f"{encoder}.yaml").read_text():
                overrides.append("encoder.pretrained=null")
            cfg = compose("train", overrides)
            labels.append(resampler_label(resampler, cfg))
            with torch.device("meta"):
                try:
                    model = instantiate(cfg.model, _convert_="object")
                except InstantiationException as error:  # Hydra wraps the CompositionError
                    if not isinstance(error.__cause__, CompositionError):
                        raise
                    cells.append("no grid to fold" if resampler == "pixel_shuffle" else "no grid to pool")
                    continue
            cells.append(f"{model.vision_tokens_per_image} x {model.resampler.out_dim}")
        enc = model.encoder
        height, width = enc.preprocessing.size
        grid = f"{enc.grid_size[0]}x{enc.grid_size[1]}" if enc.spatial else f"{enc.num_tokens} queries"
        name = f"`{encoder}`" + (f" {enc.variant}" if enc.variant else "")
        rows.append(f"| {name} | {height}x{width} | {grid} x {enc.output_dim} | " + " | ".join(cells) + " |")
        header = header or labels
    lines = [
        "| encoder (default) | image | encoder tokens x width | " + " | ".join(header) + " |",
        "|---" * (3 + len(header)) + "|",
        *rows,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(token_table())
