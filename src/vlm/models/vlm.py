"""The composed model: encoder -> resampler -> projector -> placeholders in the LLM's input."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vlm.models.encoders.base import VisionEncoder
from vlm.models.resamplers import Resampler


class PlaceholderCountError(ValueError):
    """The token sequence has a different number of `<image>` placeholders than vision embeddings."""


class VisionLanguageModel(nn.Module):
    """encoder(views) -> resampler -> projector -> scattered into the `<image>` positions -> llm.

    `resampler` and `projector` are factories (Hydra `_partial_`) completed here with the widths of the
    parts around them, so any combination composes; an impossible one fails now, not mid-forward.
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        resampler: Callable[..., Resampler],
        projector: Callable[..., nn.Module],
        llm: nn.Module,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.resampler = resampler(in_dim=encoder.output_dim)
        self.vision_grid = self.resampler.output_grid(encoder.grid_size)
        self.projector = projector(in_dim=self.resampler.out_dim, out_dim=llm.hidden_size)
        self.llm = llm

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def vision_tokens_per_image(self) -> int:
        rows, cols = self.vision_grid
        return rows * cols

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N_images, 3, H, W) -> (N_images, vision_tokens_per_image, llm width)."""
        return self.project(self.encoder(pixel_values))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features (N, rows*cols, D_enc) -> resampled, projected (N, M, D_llm)."""
        features = self.resampler(features, self.encoder.grid_size)  # (N, M, D_enc')
        return self.projector(features)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        vision: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with every `<image>` position replaced by a vision embedding, in order.

        Pass `pixel_values`, or `vision` (N_images, M, D_llm) when the images are already encoded.
        """
        embeds = self.llm.embed(input_ids)
        is_placeholder = input_ids == self.tokenizer.image_token_id
        num_placeholders = int(is_placeholder.sum())
        if vision is None and pixel_values is not None and pixel_values.shape[0] > 0:
            vision = self.encode_images(pixel_values)
        if vision is None:
            if num_placeholders:
                raise PlaceholderCountError(f"{num_placeholders} <image> placeholders but no images")
            return embeds
        if num_placeholders != vision.shape[0] * vision.shape[1]:
            raise PlaceholderCountError(
                f"the token ids hold {num_placeholders} <image> placeholders but the "
                f"{vision.shape[0]} image(s) give {vision.shape[0] * vision.shape[1]} vision embeddings "
                f"({self.vision_tokens_per_image} per image)"
            )
        embeds = embeds.clone()
        embeds[is_placeholder] = vision.flatten(0, 1).to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        vision: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V)."""
        return self.llm(self.embed_inputs(input_ids, pixel_values, vision), attention_mask=attention_mask)
