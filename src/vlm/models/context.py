"""Text-side controls: the text an image shows, given to the LLM in the same K positions.

`context=vision` (the default) fills each `<image>`'s K = `vision_tokens_per_image` positions from the
page image. The text arms fill them from the text the image shows, with the same prompt, projector and
LLM, so optical compression is measured against text compressed to the same number of positions:

- `text_meanpool`: the LLM's input embeddings of the text averaged over K contiguous segments
  (`MeanPoolCompressor`, no parameters of its own);
- `text_conv`: a learned convolutional compressor of those embeddings to K tokens (`ConvCompressor`);
- `truncate`: the text's first K token ids in place of the placeholders (`vlm.data.processing`);
- `full_text`: all of the text's token ids (the upper bound, in as many positions as it needs).

A prompt with several `<image>`s (a document's pages) has one text per `<image>`, each filling its own
image's positions (`vlm.data.processing.SampleProcessor.text_context`): the compressors see one row per
`<image>`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def segment_means(embeds: torch.Tensor, lengths: torch.Tensor, segments: int) -> torch.Tensor:
    """(N, L, D) right-padded rows of `lengths` vectors -> (N, segments, D): each row averaged over
    `segments` contiguous segments; a row shorter than `segments` repeats vectors (each segment has one)."""
    index = torch.arange(segments, device=embeds.device)
    start = index * lengths[:, None] // segments  # (N, segments)
    end = torch.maximum((index + 1) * lengths[:, None] // segments, start + 1)
    position = torch.arange(embeds.shape[1], device=embeds.device)[:, None, None]  # (L, 1, 1)
    inside = ((position >= start) & (position < end)).permute(1, 2, 0).to(embeds.dtype)  # (N, segments, L)
    return (inside / inside.sum(-1, keepdim=True)) @ embeds


class MeanPoolCompressor(nn.Module):
    """Token embeddings (N, L, D) -> their means over `tokens` contiguous segments (N, tokens, D)."""

    def __init__(self, in_dim: int, tokens: int) -> None:
        super().__init__()
        self.out_dim, self.tokens = in_dim, tokens

    def forward(self, embeds: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return segment_means(embeds, lengths, self.tokens)


class ConvBlock(nn.Module):
    """Pre-norm residual block on (N, L, C): LayerNorm -> conv along the sequence -> GELU -> linear."""

    def __init__(self, width: int, kernel_size: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.conv = nn.Conv1d(width, width, kernel_size, padding=kernel_size // 2)
        self.mix = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mix(F.gelu(h))


class ConvCompressor(nn.Module):
    """Token embeddings -> `tokens x 2**stages` segment means -> `stages` x (`blocks` conv blocks, then a
    stride-2 conv) -> (N, tokens, width): a hierarchical text compressor with a fixed output count.

    A text of up to `tokens x 2**stages` tokens enters whole (a segment per token); a longer one is
    averaged into that many segments first.
    """

    def __init__(
        self,
        in_dim: int,
        tokens: int,
        width: int = 256,
        stages: int = 2,
        blocks: int = 2,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"context.compressor.kernel_size={kernel_size}: expected an odd size")
        self.tokens, self.out_dim, self.segments = tokens, width, tokens * 2**stages
        self.input = nn.Linear(in_dim, width)
        self.stages = nn.ModuleList(
            nn.ModuleDict(
                {
                    "blocks": nn.Sequential(*(ConvBlock(width, kernel_size) for _ in range(blocks))),
                    "down": nn.Conv1d(width, width, kernel_size=2, stride=2),
                }
            )
            for _ in range(stages)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, embeds: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.input(segment_means(embeds, lengths, self.segments))  # (N, tokens * 2**stages, width)
        for stage in self.stages:
            x = stage["blocks"](x)
            x = stage["down"](x.transpose(1, 2)).transpose(1, 2)  # (N, L, width) -> (N, L/2, width)
        return self.norm(x)  # (N, tokens, width)
