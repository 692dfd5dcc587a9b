"""Token reducers between encoder and projector. Each knows its output grid and width from its input."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Grid = tuple[int, int]


class Resampler(nn.Module):
    """`forward(x (B, rows*cols, in_dim), grid) -> (B, out_rows*out_cols, out_dim)`."""

    out_dim: int

    def output_grid(self, grid: Grid) -> Grid:
        raise NotImplementedError


class Identity(Resampler):
    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.out_dim = in_dim

    def output_grid(self, grid: Grid) -> Grid:
        return grid

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        return x


class PixelShuffle(Resampler):
    """Fold each `factor x factor` neighbourhood into one token: (B, h*w, C) -> (B, h/s * w/s, C*s²)."""

    def __init__(self, in_dim: int, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.out_dim = in_dim * factor * factor

    def output_grid(self, grid: Grid) -> Grid:
        rows, cols = grid
        if rows % self.factor or cols % self.factor:
            raise ValueError(
                f"resampler=pixel_shuffle with factor {self.factor} needs a token grid divisible "
                f"by it, but the encoder gives a {rows}x{cols} grid"
            )
        return rows // self.factor, cols // self.factor

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        B, _, C = x.shape
        s = self.factor
        out_rows, out_cols = self.output_grid(grid)
        x = x.view(B, out_rows, s, out_cols, s, C).permute(0, 1, 3, 2, 4, 5)  # (B, h/s, w/s, s, s, C)
        return x.reshape(B, out_rows * out_cols, s * s * C)


class AvgPool(Resampler):
    """Average-pool the token grid down to `tokens` (a square grid) or an explicit `grid`."""

    def __init__(self, in_dim: int, tokens: int | None = None, grid: Grid | None = None) -> None:
        super().__init__()
        if (tokens is None) == (grid is None):
            raise ValueError("resampler=avgpool needs exactly one of `tokens` or `grid`")
        if tokens is not None:
            side = math.isqrt(tokens)
            if side * side != tokens:
                raise ValueError(f"resampler=avgpool tokens={tokens} is not a square; give `grid` instead")
            grid = (side, side)
        self.target = tuple(grid)
        self.out_dim = in_dim

    def output_grid(self, grid: Grid) -> Grid:
        if self.target[0] > grid[0] or self.target[1] > grid[1]:
            raise ValueError(
                f"resampler=avgpool cannot pool a {grid[0]}x{grid[1]} grid up to "
                f"{self.target[0]}x{self.target[1]}"
            )
        return self.target

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
    """`num_queries` learned queries cross-attend to the encoder tokens through `depth` blocks."""

    def __init__(self, in_dim: int, num_queries: int = 64, depth: int = 2, heads: int = 8) -> None:
        super().__init__()
        if in_dim % heads:
            raise ValueError(f"resampler=perceiver heads={heads} must divide the encoder width {in_dim}")
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
