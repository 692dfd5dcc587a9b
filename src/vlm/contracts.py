"""The contracts between the layers: the types that pass from one to another, and what each swappable
part (encoder, resampler, projector, LLM, tokenizer) must offer, as `typing.Protocol`s.

This module depends on torch alone, so the data layer (processing), the models and the training code all
import it without importing each other. `tests/test_contracts.py` checks every configured option of
each part against its protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypedDict, runtime_checkable

import torch

Grid = tuple[int, int]  # (rows, cols) of a token grid

# the context arms: what fills an <image>'s K positions (vlm.models.context)
CONTEXTS = ("vision", "text_meanpool", "text_conv", "truncate", "full_text")
COMPRESSED = ("text_meanpool", "text_conv")  # vectors in the K placeholder positions, through the projector
IN_PROMPT = ("truncate", "full_text")  # the text's token ids in the prompt instead of placeholders


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


class _BatchCore(TypedDict):
    keys: list[str]  # one per sample
    input_ids: torch.Tensor  # (rows, T) prompt then answer, right-padded (a packed row: several samples)
    labels: torch.Tensor  # (rows, T) the answer's ids and eos, IGNORE_INDEX elsewhere
    attention_mask: torch.Tensor  # (rows, T) 1 on tokens, 0 on padding
    prompt_ids: torch.Tensor  # (samples, P) the prompts alone, left-padded: what generation starts from
    prompt_mask: torch.Tensor  # (samples, P)
    pixel_values: torch.Tensor | TiledViews  # every sample's images, sample after sample
    images_per_sample: torch.Tensor  # (samples,)
    answers: list[list[str]]  # each sample's reference answers
    skipped: dict[str, int]  # bad samples skipped while this batch was read, by reason


class Batch(_BatchCore, total=False):
    """What the collators give the model, the module and the benchmarks (`vlm.data.processing.Collator`;
    `tests/test_contracts.py` checks every collator's keys against it)."""

    image_text_ids: list[torch.Tensor]  # each image's own text (longdoc pages): per-image reading losses
    context_ids: torch.Tensor  # (images, L) a compressed text arm's texts, one row per <image>
    context_mask: torch.Tensor  # (images, L)
    segment_ids: torch.Tensor  # (rows, T) packed rows: 1, 2, ... per sample, 0 on padding
    sample_labels: torch.Tensor  # (samples, T') packed batches: each sample's own labels row
    sources: dict[str, int]  # training: samples per data source
    failed: list[tuple[str, str]]  # generation: (key, why) of items that could not be read
    max_new_tokens: int  # generation: the benchmark's budget (`VLMModule.predict_step`)


def context_inputs(batch: Mapping) -> dict:
    """What a batch gives the model's `encode` (and so its forward and `generate`): the images, and for a
    text arm the texts to compress (`context_ids`, `context_mask`: one row per `<image>`)."""
    return {
        "pixel_values": batch.get("pixel_values"),
        "context_ids": batch.get("context_ids"),
        "context_mask": batch.get("context_mask"),
    }


# -- the parts --------------------------------------------------------------------------------------
@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> ids, with the special ids the model and the processor need."""

    bos_id: int
    eos_id: int
    pad_id: int
    image_token_id: int

    @property
    def vocab_size(self) -> int: ...

    @property
    def stop_ids(self) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def format_prompt(self, user_text: str) -> str: ...


@runtime_checkable
class ImageEncoder(Protocol):
    """Pixels (B, 3, H, W), or `TiledViews` for a tiling encoder, -> features (B, rows*cols, output_dim)."""

    option: str
    output_dim: int
    preprocessing: ImagePreprocessing
    spatial: bool
    block_classes: tuple[type[torch.nn.Module], ...]

    @property
    def grid_size(self) -> Grid: ...

    def __call__(self, pixel_values): ...


@runtime_checkable
class TokenResampler(Protocol):
    """Features (B, rows*cols, in_dim) and their grid -> (B, out_rows*out_cols, out_dim); `output_grid`
    raises a ValueError naming the option when a grid does not suit it."""

    option: str
    out_dim: int

    def output_grid(self, grid: Grid) -> Grid: ...

    def num_tokens(self, grid: Grid) -> int: ...

    def __call__(self, x: torch.Tensor, grid: Grid) -> torch.Tensor: ...


@runtime_checkable
class Projector(Protocol):
    """Vision tokens (B, N, in_dim) -> the LLM's width (B, N, hidden_size)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class LanguageModel(Protocol):
    """A decoder driven by input embeddings, so vision tokens can be spliced in."""

    tokenizer: Tokenizer
    block_classes: tuple[type[torch.nn.Module], ...]

    @property
    def hidden_size(self) -> int: ...

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def new_kv_cache(self, batch_size: int, max_len: int): ...

    def set_activation_checkpointing(self, enabled: bool) -> None: ...

    def __call__(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache=None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor: ...


__all__: Sequence[str] = (
    "COMPRESSED",
    "CONTEXTS",
    "IN_PROMPT",
    "Grid",
    "ImageEncoder",
    "ImagePreprocessing",
    "LanguageModel",
    "Projector",
    "TiledViews",
    "Tiling",
    "TokenResampler",
    "Tokenizer",
)
