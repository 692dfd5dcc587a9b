"""What every vision encoder reports: output width, token grid, preprocessing, block classes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Tiling:
    """Dynamic tiling (InternVL, DeepSeek-OCR's gundam mode) on top of the global view.

    An image larger than `tile_size` on either side is also resized to a grid of `tile_size` tiles,
    between `min_tiles` and `max_tiles` of them, whose aspect ratio is closest to the image's.
    `tokens_per_tile` and `newline` say how many placeholders the tiles take, so that the processor
    can count them: rows x (cols + 1 newline) over the tiles' joined token grid.
    """

    tile_size: int = 640
    min_tiles: int = 2
    max_tiles: int = 9
    tokens_per_tile: tuple[int, int] = (10, 10)  # (rows, cols) of encoder tokens per tile
    newline: bool = True  # the model appends a newline position after every row of tile tokens

    def choose_grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of tiles for an image of width x height; (0, 0) when it is too small to tile."""
        if width <= self.tile_size and height <= self.tile_size:
            return 0, 0
        # (cols, rows) candidates ordered by tile count, as the official code orders them; a tie in
        # aspect ratio goes to the larger grid when the image has more than half its pixels
        candidates = sorted(
            {
                (cols, rows)
                for n in range(self.min_tiles, self.max_tiles + 1)
                for cols in range(1, n + 1)
                for rows in range(1, n + 1)
                if self.min_tiles <= cols * rows <= self.max_tiles
            },
            key=lambda grid: grid[0] * grid[1],
        )
        aspect_ratio = width / height
        best, best_diff = (1, 1), float("inf")
        for cols, rows in candidates:
            diff = abs(aspect_ratio - cols / rows)
            if diff < best_diff:
                best, best_diff = (cols, rows), diff
            elif diff == best_diff and width * height > 0.5 * self.tile_size**2 * cols * rows:
                best = (cols, rows)
        return best[1], best[0]

    def local_positions(self, tile_grid: tuple[int, int]) -> int:
        """Placeholders that the tiles of one image take (0 for an untiled image)."""
        rows, cols = tile_grid
        if rows * cols == 0:
            return 0
        token_rows, token_cols = self.tokens_per_tile
        return rows * token_rows * (cols * token_cols + int(self.newline))


@dataclass(frozen=True)
class ImagePreprocessing:
    """How an image becomes the encoder's input tensor."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: str = "resize"  # "resize" (stretch) or "pad" (keep aspect, pad with `pad_color`)
    pad_color: tuple[int, int, int] = (127, 127, 127)
    tiling: Tiling | None = None  # tiles besides the global view of `size` (DeepEncoder gundam)


@dataclass
class TiledViews:
    """Images as a tiling encoder sees them: a global view per image plus that image's tiles.

    The same structure carries pixels (global (N, 3, H, W), tiles (T, 3, h, w)) into the encoder and
    features (global (N, G, D), tiles (T, g, D)) out of it. Image i has `tile_grids[i]` = (rows, cols)
    tiles, (0, 0) when untiled; they follow those of images < i in `tiles`, row by row.
    """

    global_views: torch.Tensor
    tiles: torch.Tensor
    tile_grids: list[tuple[int, int]]

    @property
    def shape(self) -> torch.Size:
        """The global views' shape: `shape[0]` counts images, as for a plain pixel tensor."""
        return self.global_views.shape

    def __len__(self) -> int:
        return self.global_views.shape[0]

    def to(self, *args, **kwargs) -> TiledViews:
        """Move or cast both tensors (what Lightning calls to move a batch to the device)."""
        return TiledViews(
            self.global_views.to(*args, **kwargs), self.tiles.to(*args, **kwargs), self.tile_grids
        )

    @staticmethod
    def cat(items: list[TiledViews]) -> TiledViews:
        return TiledViews(
            torch.cat([item.global_views for item in items]),
            torch.cat([item.tiles for item in items]),
            [grid for item in items for grid in item.tile_grids],
        )


class VisionEncoder(nn.Module):
    """Base class: `forward(pixel_values (B, 3, H, W)) -> features (B, N, output_dim)`.

    A tiling encoder (`preprocessing.tiling` set) takes and returns `TiledViews` instead.
    """

    option: str = "encoder=?"  # how the command line names it, for messages
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
