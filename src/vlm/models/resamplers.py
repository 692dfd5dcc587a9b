"""Token reducers between encoder and projector. Each knows its output grid and width from its input."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlm.contracts import Grid


def common_divisors(a: int, b: int) -> list[int]:
    return [d for d in range(1, math.gcd(a, b) + 1) if a % d == 0 and b % d == 0]


class Resampler(nn.Module):
    """`forward(x (B, rows*cols, in_dim), grid) -> (B, out_rows*out_cols, out_dim)`.

    `output_grid` raises a ValueError naming the option and the numbers when the grid does not suit it;
    `VisionLanguageModel` asks it at construction, so that happens at start-up.
    """

    option: str = "resampler=?"  # as VisionEncoder.option: the Hydra choice, else the class's name

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.option = f"resampler={cls.__name__}"

    out_dim: int
    needs_spatial_grid = False  # folds or pools neighbouring patches, so a query set will not do

    def output_grid(self, grid: Grid) -> Grid:
        raise NotImplementedError

    def num_tokens(self, grid: Grid) -> int:
        rows, cols = self.output_grid(grid)
        return rows * cols


class Identity(Resampler):
    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.out_dim = in_dim

    def output_grid(self, grid: Grid) -> Grid:
        return grid

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        return x


class PixelShuffle(Resampler):
    """Fold each `rows x cols` neighbourhood into one token: (B, h*w, C) -> (B, h/r * w/c, C*r*c).

    `factor` is one number for a square neighbourhood or `[rows, cols]`: a one-line strip's grid (the
    tiny encoder's 2x32) folds as [2, 8] into 4 tokens, each a quarter of the line.
    """

    needs_spatial_grid = True

    def __init__(self, in_dim: int, factor: int | tuple[int, int] = 2) -> None:
        super().__init__()
        rows, cols = (factor, factor) if isinstance(factor, int) else tuple(factor)
        if rows < 1 or cols < 1:
            raise ValueError(f"resampler=pixel_shuffle needs factors >= 1, got {factor}")
        self.factor = (rows, cols)
        self.out_dim = in_dim * rows * cols

    def output_grid(self, grid: Grid) -> Grid:
        rows, cols = grid
        r, c = self.factor
        if rows % r or cols % c:
            square = r == c
            shown = r if square else f"{r}x{c}"
            choices = (
                f"choose resampler.factor among {', '.join(map(str, common_divisors(rows, cols)))}"
                if square
                else f"rows among {', '.join(map(str, common_divisors(rows, rows)))}, "
                f"cols among {', '.join(map(str, common_divisors(cols, cols)))}"
            )
            raise ValueError(
                f"{self.option} with factor {shown} needs a token grid whose sides it "
                f"divides, but the encoder gives a {rows}x{cols} grid ({choices})"
            )
        return rows // r, cols // c

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        B, _, C = x.shape
        r, c = self.factor
        out_rows, out_cols = self.output_grid(grid)
        x = x.view(B, out_rows, r, out_cols, c, C).permute(0, 1, 3, 2, 4, 5)  # (B, h/r, w/c, r, c, C)
        return x.reshape(B, out_rows * out_cols, r * c * C)


class AvgPool(Resampler):
    """Average-pool the token grid down to `tokens` tokens, or to an explicit `grid: [rows, cols]` (with
    `tokens=None`: resampler.tokens=null resampler.grid=[rows,cols]).

    For `tokens`, the output grid is the factorisation rows x cols = tokens that fits in the input grid
    and is closest to its aspect ratio (16 tokens: 4x4 from 32x32, 1x16 from 2x32).
    """

    needs_spatial_grid = True

    def __init__(self, in_dim: int, tokens: int | None = 16, grid: Grid | None = None) -> None:
        super().__init__()
        if (tokens is None) == (grid is None):
            raise ValueError(
                f"resampler=avgpool needs exactly one of `tokens` or `grid`, got tokens={tokens}, grid={grid}"
                " (a grid goes with tokens=null)"
            )
        self.tokens = tokens
        self.grid = tuple(grid) if grid is not None else None
        self.out_dim = in_dim

    def output_grid(self, grid: Grid) -> Grid:
        rows, cols = grid
        if self.grid is not None:
            if self.grid[0] > rows or self.grid[1] > cols:
                raise ValueError(
                    f"{self.option} cannot pool a {rows}x{cols} grid up to {self.grid[0]}x{self.grid[1]}"
                )
            return self.grid
        fits = [(r, self.tokens // r) for r in range(1, rows + 1) if self.tokens % r == 0]
        fits = [(r, c) for r, c in fits if c <= cols]
        if not fits:
            raise ValueError(
                f"{self.option} cannot pool a {rows}x{cols} grid ({rows * cols} tokens) to "
                f"{self.tokens} tokens (no rows x cols = {self.tokens} fits in it)"
            )
        aspect = math.log(rows / cols)
        return min(fits, key=lambda rc: abs(math.log(rc[0] / rc[1]) - aspect))

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        B, _, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, *grid)
        return F.adaptive_avg_pool2d(x, self.output_grid(grid)).flatten(2).transpose(1, 2)


class PerceiverBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(x)
        queries = queries + self.attn(self.norm_q(queries), kv, kv, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


class Perceiver(Resampler):
    """`num_queries` learned queries cross-attend to the encoder tokens through `depth` blocks, each
    cross-attention then an MLP (pre-norm, residual); a final LayerNorm."""

    def __init__(self, in_dim: int, num_queries: int = 16, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        if in_dim % heads:
            raise ValueError(
                f"resampler=perceiver with heads={heads} needs a width it divides, but the encoder's "
                f"width is {in_dim} (choose resampler.heads among "
                f"{', '.join(str(h) for h in range(1, 33) if in_dim % h == 0)})"
            )
        if num_queries < 1 or depth < 1:
            raise ValueError(
                f"resampler=perceiver needs num_queries and depth >= 1, got {num_queries}, {depth}"
            )
        self.queries = nn.Parameter(torch.randn(1, num_queries, in_dim) * 0.02)
        self.blocks = nn.ModuleList(PerceiverBlock(in_dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(in_dim)
        self.out_dim = in_dim

    def output_grid(self, grid: Grid) -> Grid:
        return 1, self.queries.shape[1]

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        queries = self.queries.expand(x.shape[0], -1, -1)
        for block in self.blocks:
            queries = block(queries, x)
        return self.norm(queries)
