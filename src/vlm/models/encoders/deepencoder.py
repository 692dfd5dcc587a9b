"""DeepSeek-OCR's DeepEncoder (arXiv 2510.18234): SAM ViT-B -> 16x conv compressor -> CLIP-L/14.

    (B, 3, S, S) -> SAM patch embedding          (B, S/16, S/16, 768)
    -> 12 blocks: window attention (14), global attention in blocks 2, 5, 8, 11
    -> neck                                       (B, 256, S/16, S/16)
    -> compressor net_2, net_3 (stride 2 each)    (B, 1024, S/64, S/64)
    -> CLIP-L: these tokens replace its patch embedding, CLS prepended -> (B, 1 + (S/64)², 1024)
    -> [CLIP without CLS ‖ compressed SAM tokens]  (B, (S/64)², 2048)

Every size is a constructor argument (official defaults). Parameter names follow the released
checkpoint (`model.sam_model.*`, `model.vision_model.*`), so its name map is the prefix `model.`.
The projector and the layout vectors that follow the encoder in DeepSeek-OCR belong to
`VisionLanguageModel` (see docs/encoders.md); `companion_weights` hands it their released values.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlm.contracts import ImagePreprocessing, TiledViews, Tiling
from vlm.models.encoders.base import VisionEncoder
from vlm.models.pretrained import load_strict, read_tensors

log = logging.getLogger(__name__)

# mode -> (input side, how an image is brought to it); gundam adds tiles to the global view
MODES = {
    "tiny": (512, "resize"),
    "small": (640, "resize"),
    "base": (1024, "pad"),
    "large": (1280, "pad"),
    "gundam": (1024, "pad"),
}
ENCODER_PREFIXES = ("model.sam_model.", "model.vision_model.")
# released names of the parts after the encoder -> their names in VisionLanguageModel
COMPANIONS = {
    "model.projector.layers.weight": "projector.layers.weight",
    "model.projector.layers.bias": "projector.layers.bias",
    "model.image_newline": "projector.image_newline",
    "model.view_seperator": "projector.view_separator",  # sic in the release
}


def resize_grid(table: torch.Tensor, side: int) -> torch.Tensor:
    """Learned positions (n, n, C) -> (side, side, C), bicubic with antialiasing in fp32 as released."""
    if table.shape[0] == side:
        return table
    resized = F.interpolate(
        table.permute(2, 0, 1)[None].float(), size=(side, side), mode="bicubic", antialias=True
    )
    return resized[0].permute(1, 2, 0).to(table.dtype)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """Apply `blocks` in order, recomputing each one's activations in backward when `checkpointing`."""
    for block in blocks:
        x = (
            checkpoint(block, x, use_reentrant=False)
            if checkpointing and torch.is_grad_enabled()
            else block(x)
        )
    return x


# -- SAM ViT-B with its neck and the 16x compressor -----------------------------------------------


def relative_positions(table: torch.Tensor, size: int) -> torch.Tensor:
    """(2L-1, C) relative position table -> (size, size, C) for query i, key j (offset i - j).

    A table trained for another length is linearly interpolated to 2*size-1 entries.
    """
    length = 2 * size - 1
    if table.shape[0] != length:
        resized = F.interpolate(table.T[None].float(), size=length, mode="linear")
        table = resized[0].T.to(table.dtype)
    offsets = torch.arange(size, device=table.device)
    return table[offsets[:, None] - offsets[None, :] + size - 1]


class SamAttention(nn.Module):
    """Multi-head attention with decomposed relative positions (MViTv2), added as an SDPA mask."""

    def __init__(self, dim: int, heads: int, side: int) -> None:
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # one entry per offset along each axis of the (side x side) grid attended over
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * side - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * side - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.position_bias(q, H, W))
        return self.proj(y.transpose(1, 2).reshape(B, H, W, C))  # (B, heads, HW, C/heads) -> (B, H, W, C)

    def position_bias(self, q: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """bias[query (h, w), key (kh, kw)] = q · (R_h[h - kh] + R_w[w - kw]) -> (B, heads, HW, HW)."""
        B, heads, _, head_dim = q.shape
        grid_q = q.view(B, heads, height, width, head_dim)
        along_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, relative_positions(self.rel_pos_h, height))
        along_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, relative_positions(self.rel_pos_w, width))
        bias = along_h[..., :, None] + along_w[..., None, :]  # (B, heads, H, W, kh, kw)
        return bias.reshape(B, heads, height * width, height * width)


class SamMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


class SamBlock(nn.Module):
    """Pre-norm block; with `window_size` > 0 it attends within zero-padded windows of that size."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, window_size: int, grid_side: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SamAttention(dim, heads, window_size or grid_side)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SamMLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + (self.windowed_attention(y) if self.window_size else self.attn(y))
        return x + self.mlp(self.norm2(x))

    def windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        s = self.window_size
        pad_h, pad_w = -H % s, -W % s
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # padded tokens take part in attention, as released
        rows, cols = (H + pad_h) // s, (W + pad_w) // s
        # (B, rows*s, cols*s, C) -> (B*rows*cols, s, s, C)
        windows = x.view(B, rows, s, cols, s, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, C)
        windows = self.attn(windows)
        x = windows.view(B, rows, cols, s, s, C).permute(0, 1, 3, 2, 4, 5).reshape(B, rows * s, cols * s, C)
        return x[:, :H, :W]


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).permute(0, 2, 3, 1)  # (B, C, h, w) -> (B, h, w, C)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SamEncoder(nn.Module):
    """SAM's ViT image encoder, its neck and DeepSeek-OCR's compressor (net_2, net_3)."""

    def __init__(
        self,
        out_dim: int,
        image_size: int = 1024,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
        neck_dim: int = 256,
        compressor_dim: int = 512,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        grid_side = image_size // patch_size
        self.checkpointing = False
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        # learned at `image_size`, resized for the others
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_side, grid_side, embed_dim))
        self.blocks = nn.ModuleList(
            SamBlock(embed_dim, heads, mlp_ratio, 0 if i in global_attn_indexes else window_size, grid_side)
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, neck_dim, kernel_size=1, bias=False),
            LayerNorm2d(neck_dim, eps=1e-6),
            nn.Conv2d(neck_dim, neck_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(neck_dim, eps=1e-6),
        )
        self.net_2 = nn.Conv2d(neck_dim, compressor_dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(compressor_dim, out_dim, kernel_size=3, stride=2, padding=1, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> compressed map (B, out_dim, S/(16*4), S/(16*4))."""
        x = self.patch_embed(pixels)  # (B, S/16, S/16, embed_dim)
        x = x + resize_grid(self.pos_embed[0], x.shape[1])
        x = run_blocks(self.blocks, x, self.checkpointing)
        x = self.neck(x.permute(0, 3, 1, 2))  # (B, neck_dim, S/16, S/16)
        return self.net_3(self.net_2(x))


# -- CLIP-L/14 fed with the compressed SAM map --------------------------------------------------------


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class ClipAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, C/heads)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class ClipMLP(nn.Module):
    def __init__(self, width: int, ffn_dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, ffn_dim), nn.Linear(ffn_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, width: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=1e-5)
        self.self_attn = ClipAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = ClipMLP(width, ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    def __init__(self, width: int, image_size: int, patch_size: int) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(width))
        # Unused: DeepEncoder feeds SAM's compressed map instead. Kept so that the released checkpoint
        # loads strictly, and frozen so that DDP does not wait for a gradient it never gets.
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.patch_embedding.requires_grad_(False)
        self.position_embedding = nn.Embedding((image_size // patch_size) ** 2 + 1, width)

    def forward(self, patch_embeds: torch.Tensor) -> torch.Tensor:
        """(B, width, h, h) -> (B, 1 + h*h, width): CLS first, learned positions resized to the grid."""
        B, width, side, _ = patch_embeds.shape
        tokens = torch.cat(
            [self.class_embedding.expand(B, 1, width), patch_embeds.flatten(2).transpose(1, 2)], 1
        )
        table = self.position_embedding.weight  # (1 + n*n, width)
        n = math.isqrt(table.shape[0] - 1)
        patch_positions = resize_grid(table[1:].view(n, n, width), side).reshape(side * side, width)
        return tokens + torch.cat([table[:1], patch_positions])


class ClipTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(width, heads, ffn_dim) for _ in range(layers))


class ClipEncoder(nn.Module):
    """CLIP-L/14's vision tower without its post-norm, taking patch embeddings from outside."""

    def __init__(
        self,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        ffn_dim: int = 4096,
        image_size: int = 224,
        patch_size: int = 14,
    ) -> None:
        super().__init__()
        self.checkpointing = False
        self.embeddings = ClipEmbeddings(width, image_size, patch_size)
        self.transformer = ClipTransformer(width, layers, heads, ffn_dim)
        self.pre_layrnorm = nn.LayerNorm(width, eps=1e-5)  # sic: the released name

    def forward(self, patch_embeds: torch.Tensor) -> torch.Tensor:
        """(B, width, h, h) -> last hidden state (B, 1 + h*h, width)."""
        x = self.pre_layrnorm(self.embeddings(patch_embeds))
        return run_blocks(self.transformer.layers, x, self.checkpointing)


# -- the encoder --------------------------------------------------------------------------------------


def keyword_defaults(cls: type, *leave_out: str) -> Mapping:
    """`cls`'s constructor defaults, read-only: the official sizes DeepEncoder passes on (conf/encoder/
    deepencoder.yaml spells out the same values)."""
    parameters = inspect.signature(cls).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.default is not p.empty and p.name not in leave_out}
    return MappingProxyType(defaults)


SAM_B = keyword_defaults(SamEncoder)
CLIP_L = keyword_defaults(ClipEncoder)
GUNDAM_TILING = keyword_defaults(Tiling, "tokens_per_tile", "newline")  # DeepEncoder sets those two


class DeepEncoder(VisionEncoder):
    """SAM -> compressor -> CLIP, fused to 2 x `clip.width` channels; one token per 64x64 pixels.

    `mode` picks the official input: tiny 512 (8x8 tokens), small 640 (10x10), base 1024 (16x16),
    large 1280 (20x20), gundam: a 1024 global view plus 640 tiles (`TiledViews`).
    """

    block_classes = (SamBlock, ClipLayer)
    # SAM with its neck and the compressor (net_2, net_3 live in sam_model, as released)
    low_level_modules = ("sam_model",)

    def __init__(
        self,
        mode: str = "base",
        sam: Mapping | None = SAM_B,
        clip: Mapping | None = CLIP_L,
        layout_tokens: bool = True,
        tiling: Mapping | None = GUNDAM_TILING,
        pretrained: str | None = None,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"encoder.mode={mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.pretrained = pretrained
        self.layout_tokens = layout_tokens
        self.vision_model = ClipEncoder(**(clip or {}))
        width = self.vision_model.pre_layrnorm.normalized_shape[0]
        self.sam_model = SamEncoder(out_dim=width, **(sam or {}))  # the compressor ends in CLIP's width
        self.output_dim = 2 * width
        self.set_activation_checkpointing(activation_checkpointing)

        size, resize = MODES[mode]
        self.tokens_per_side(size)  # fails now for a patch size that does not divide the input
        tiles = None
        if mode == "gundam":
            tiling = dict(tiling or {})
            side = self.tokens_per_side(tiling.get("tile_size", Tiling.tile_size))
            tiles = Tiling(**tiling, tokens_per_tile=(side, side), newline=layout_tokens)
        self.preprocessing = ImagePreprocessing(size=(size, size), resize=resize, tiling=tiles)

        if pretrained:
            load_strict(self, read_tensors(pretrained, ENCODER_PREFIXES), "model.", pretrained)
            log.info("encoder=deepencoder: SAM and CLIP weights loaded from %s", pretrained)

    @property
    def variant(self) -> str:
        return f"mode={self.mode}"

    def tokens_per_side(self, size: int) -> int:
        """Tokens along one side of a size x size view: patches, then two stride-2 convolutions."""
        patch = self.sam_model.patch_size
        if size % patch:
            raise ValueError(
                f"encoder=deepencoder: views of {size} pixels are not a multiple of patch {patch}"
            )
        return math.ceil(size // patch / 4)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each SAM and CLIP block's activations in backward instead of keeping them."""
        self.sam_model.checkpointing = self.vision_model.checkpointing = enabled

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.tokens_per_side(self.preprocessing.size[0])
        return side, side

    def encode(self, pixels: torch.Tensor, size: int) -> torch.Tensor:
        """Views (B, 3, size, size) -> fused features (B, tokens, 2 x CLIP width)."""
        if tuple(pixels.shape[-2:]) != (size, size):
            raise ValueError(
                f"encoder=deepencoder mode={self.mode} expects {size}x{size} views, got "
                f"{tuple(pixels.shape[-2:])}"
            )
        side = self.tokens_per_side(size)
        if pixels.shape[0] == 0:
            return pixels.new_zeros(0, side * side, self.output_dim)
        sam = self.sam_model(pixels.to(self.sam_model.pos_embed.dtype))  # (B, width, side, side)
        clip = self.vision_model(sam)  # (B, 1 + side², width)
        return torch.cat([clip[:, 1:], sam.flatten(2).transpose(1, 2)], dim=-1)

    def forward(self, pixel_values: torch.Tensor | TiledViews) -> torch.Tensor | TiledViews:
        size = self.preprocessing.size[0]
        if not isinstance(pixel_values, TiledViews):
            return self.encode(pixel_values, size)
        if self.preprocessing.tiling is None:
            raise ValueError(f"encoder=deepencoder mode={self.mode} takes no tiles; only mode=gundam does")
        return TiledViews(
            self.encode(pixel_values.global_views, size),
            self.encode(pixel_values.tiles, self.preprocessing.tiling.tile_size),
            pixel_values.tile_grids,
        )

    def companion_weights(self) -> dict[str, torch.Tensor]:
        if not self.pretrained:
            return {}
        tensors = read_tensors(self.pretrained, tuple(COMPANIONS))
        return {COMPANIONS[name]: value for name, value in tensors.items()}
