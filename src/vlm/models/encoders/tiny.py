"""A small conv-stem ViT for CPU experiments on rendered text."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.contracts import ImagePreprocessing
from vlm.models.encoders.base import VisionEncoder


class EncoderBlock(nn.Module):
    """Pre-norm transformer block with bidirectional attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        x = x + self.proj(y.transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(self.norm2(x))


class TinyEncoder(VisionEncoder):
    """`stages` stride-2 convolutions, a learned position table, `depth` transformer blocks.

    (B, 3, H, W) -> stem -> (B, dim, H/s, W/s) with s = 2**stages -> flatten row-major -> blocks
    -> (B, H/s * W/s, dim)
    """

    block_classes = (EncoderBlock,)
    low_level_modules = ("stem",)

    def __init__(
        self,
        image_size: tuple[int, int] = (32, 512),
        dim: int = 192,
        depth: int = 3,
        heads: int = 4,
        stages: int = 4,
        resize: str = "resize",
    ) -> None:
        super().__init__()
        height, width = image_size
        self.stride = 2**stages
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"encoder=tiny with {stages} stages needs an image size divisible by "
                f"{self.stride}, got {height}x{width}"
            )
        self.preprocessing = ImagePreprocessing(size=(height, width), resize=resize)
        self.output_dim = dim
        widths = [3] + [dim // 2 ** (stages - 1 - i) for i in range(stages)]  # ..., dim/4, dim/2, dim
        layers: list[nn.Module] = []
        for i in range(stages):
            # per-image normalisation keeps every stage's output at unit scale, whatever the depth
            layers += [
                nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1),
                nn.GroupNorm(1, widths[i + 1]),
                nn.GELU(),
            ]
        self.stem = nn.Sequential(*layers[:-1])
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    @property
    def grid_size(self) -> tuple[int, int]:
        height, width = self.preprocessing.size
        return height // self.stride, width // self.stride

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if tuple(pixel_values.shape[-2:]) != self.preprocessing.size:
            raise ValueError(
                f"encoder=tiny expects images of {self.preprocessing.size}, "
                f"got {tuple(pixel_values.shape[-2:])}"
            )
        x = self.stem(pixel_values).flatten(2).transpose(1, 2)  # (B, dim, h, w) -> (B, h*w, dim)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
