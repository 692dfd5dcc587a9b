"""What every vision encoder reports: output width, token grid, preprocessing, block classes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ImagePreprocessing:
    """How an image becomes the encoder's input tensor."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: str = "resize"  # "resize" (stretch) or "pad" (keep aspect, pad with `pad_color`)
    pad_color: tuple[int, int, int] = (127, 127, 127)


class VisionEncoder(nn.Module):
    """Base class: `forward(pixel_values (B, 3, H, W)) -> features (B, N, output_dim)`."""

    output_dim: int
    preprocessing: ImagePreprocessing
    block_classes: tuple[type[nn.Module], ...] = ()
    # sub-modules that DeepSeek-OCR's stage 2 keeps frozen (DeepEncoder: SAM and the compressor)
    low_level_modules: tuple[str, ...] = ()

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, cols) of the feature grid for an image of `preprocessing.size`."""
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
