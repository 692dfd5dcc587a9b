"""Projectors from the resampler's width to the LLM's hidden size."""

from __future__ import annotations

from torch import nn


def linear(in_dim: int, out_dim: int, bias: bool = True) -> nn.Module:
    return nn.Linear(in_dim, out_dim, bias=bias)


def mlp(in_dim: int, out_dim: int, hidden_dim: int | None = None, layernorm: bool = False) -> nn.Module:
    """Two layers with GELU, optionally a LayerNorm on the input."""
    hidden_dim = hidden_dim or out_dim
    layers = [nn.LayerNorm(in_dim)] if layernorm else []
    layers += [nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)]
    return nn.Sequential(*layers)
