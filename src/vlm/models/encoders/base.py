"""What every vision encoder reports: output width, token grid, preprocessing, block classes."""

from __future__ import annotations

import torch
from torch import nn

from vlm.contracts import ImagePreprocessing


class VisionEncoder(nn.Module):
    """Base class: `forward(pixel_values (B, 3, H, W)) -> features (B, N, output_dim)`.

    A tiling encoder (`preprocessing.tiling` set) takes and returns `TiledViews` instead.
    """

    # how the command line names it, for messages: `encoder=<the Hydra choice>`, set by the model from
    # its config (`model.options`); built without one, the class's name
    option: str = "encoder=?"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.option = f"encoder={cls.__name__}"

    output_dim: int
    preprocessing: ImagePreprocessing
    block_classes: tuple[type[nn.Module], ...] = ()
    # False when the tokens are not a spatial grid (BLIP-2's learned queries): resamplers that fold or
    # pool neighbouring patches refuse them
    spatial: bool = True
    # False for encoders that stay frozen whatever the stage says, unless `encoder.trainable=true`
    # (BLIP-2, as vision-encoded-nanochat uses it)
    trainable: bool = True
    # sub-modules that DeepSeek-OCR's stage 2 keeps frozen (DeepEncoder: SAM and the compressor)
    low_level_modules: tuple[str, ...] = ()
    # DeepSeek-OCR's layout: the model appends a learned vector after every row of an image's vision
    # tokens and another after the image (`projectors.WithLayout`)
    layout_tokens: bool = False

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, cols) of the feature grid for an image of `preprocessing.size`."""
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    def describe(self) -> str:
        """One line for start-up logs and composition errors: option, input size, token grid, width."""
        height, width = self.preprocessing.size
        rows, cols = self.grid_size
        layout = f"{rows}x{cols} grid" if self.spatial else f"{rows * cols} tokens (no spatial grid)"
        name = f"{self.option} {self.variant}" if self.variant else self.option
        return f"{name} ({height}x{width} image -> {layout} of width {self.output_dim})"

    @property
    def variant(self) -> str:
        """Which model of the family, for `describe` (e.g. the timm model name)."""
        return ""

    def companion_weights(self) -> dict[str, torch.Tensor]:
        """Weights that the encoder's checkpoint holds for the parts after it (projector, layout
        vectors), named as in `VisionLanguageModel`; it loads them when their shapes match."""
        return {}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
