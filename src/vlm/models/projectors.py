"""Projectors from the resampler's width to the LLM's hidden size."""

from __future__ import annotations

import torch
from torch import nn


def linear(in_dim: int, out_dim: int, bias: bool = True) -> nn.Module:
    return nn.Linear(in_dim, out_dim, bias=bias)


def mlp(in_dim: int, out_dim: int, hidden_dim: int | None = None, layernorm: bool = True) -> nn.Module:
    """Two layers with GELU, optionally a LayerNorm on the input."""
    hidden_dim = hidden_dim or out_dim
    layers = [nn.LayerNorm(in_dim)] if layernorm else []
    layers += [nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)]
    return nn.Sequential(*layers)


class WithLayout(nn.Module):
    """A projector followed by DeepSeek-OCR's layout vectors, in the LLM's width: `image_newline`
    closes every row of an image's vision tokens and `view_separator` closes the image.

    They live in the projector part, so that stages train, freeze and scale them with it. The wrapped
    projector is `layers`, the name DeepSeek-OCR's release gives its linear projector.
    """

    def __init__(self, layers: nn.Module, width: int) -> None:
        super().__init__()
        self.layers = layers
        std = width**-0.5  # as DeepSeek-OCR initialises them
        self.image_newline = nn.Parameter(torch.randn(width) * std)
        self.view_separator = nn.Parameter(torch.randn(width) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def close_rows(self, grid: torch.Tensor) -> torch.Tensor:
        """(..., rows, cols, D) -> (..., rows*(cols+1), D), a newline after every row."""
        newline = self.image_newline.to(grid.dtype).expand(*grid.shape[:-2], 1, grid.shape[-1])
        return torch.cat([grid, newline], dim=-2).flatten(-3, -2)

    def close_image(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., M, D) -> (..., M+1, D), the separator last."""
        separator = self.view_separator.to(tokens.dtype).expand(*tokens.shape[:-2], 1, tokens.shape[-1])
        return torch.cat([tokens, separator], dim=-2)
