"""BLIP-2's image side through transformers: EVA ViT-g -> Q-Former with 32 learned queries.

    (B, 3, 224, 224) -> Blip2VisionModel (EVA ViT-g/14, post-layernorm) -> (B, 257, 1408)
    -> Blip2QFormerModel: the queries (1, 32, 768), layer-normed, self-attend and cross-attend to
       those features every other layer -> (B, 32, 768)

As vision-encoded-nanochat uses it: the whole part is frozen (`trainable: false`) and only the
projector after it learns. The parts are transformers' own classes under the checkpoint's names
(`vision_model.*`, `qformer.*`, `query_tokens`), so a `Salesforce/blip2-*` checkpoint (local directory
or Hub id) loads strictly; its `language_projection.*` and `language_model.*` are not read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import Blip2Config, Blip2QFormerModel, Blip2VisionModel
from transformers.models.blip_2.modeling_blip_2 import Blip2EncoderLayer, Blip2QFormerLayer

from vlm.contracts import ImagePreprocessing
from vlm.models.encoders.base import VisionEncoder
from vlm.models.pretrained import checkpoint_dir, load_strict, read_tensors

log = logging.getLogger(__name__)

PREFIXES = ("vision_model.", "qformer.", "query_tokens")
# BLIP-2's image processor (OpenAI CLIP statistics), when the checkpoint has no preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Blip2Encoder(VisionEncoder):
    """Q-Former query outputs (B, num_query_tokens, qformer width): a set of tokens, not a grid.

    With `pretrained` (a directory holding `config.json` and safetensors, or a Hub id) the sizes come
    from the checkpoint's config and every tensor is loaded strictly. Without it the part is built
    from `Blip2Config(vision_config=..., qformer_config=..., num_query_tokens=...)` with fresh
    weights: official sizes by default, small ones for tests.
    """

    spatial = False
    block_classes = (Blip2EncoderLayer, Blip2QFormerLayer)

    def __init__(
        self,
        pretrained: str | None = "Salesforce/blip2-opt-2.7b",
        num_query_tokens: int = 32,
        vision_config: dict | None = None,
        qformer_config: dict | None = None,
        trainable: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        source = checkpoint_dir(pretrained) if pretrained else None
        if source is not None:
            if vision_config or qformer_config:
                raise ValueError(
                    "encoder=blip2: vision_config and qformer_config build a fresh model; with "
                    f"encoder.pretrained={pretrained} the sizes come from its config.json"
                )
            config = Blip2Config.from_pretrained(source)
        else:
            config = Blip2Config(
                vision_config=dict(vision_config or {}),
                qformer_config=dict(qformer_config or {}),
                num_query_tokens=num_query_tokens,
            )
        self.config = config
        self.vision_model = Blip2VisionModel(config.vision_config)
        width = config.qformer_config.hidden_size
        self.query_tokens = nn.Parameter(
            torch.randn(1, config.num_query_tokens, width) * config.qformer_config.initializer_range
        )
        self.qformer = Blip2QFormerModel(config.qformer_config)
        if activation_checkpointing:
            self.vision_model.gradient_checkpointing_enable()
            self.qformer.gradient_checkpointing_enable()
        self.trainable = trainable
        self.output_dim = width

        side = config.vision_config.image_size
        mean, std = CLIP_MEAN, CLIP_STD
        if source is not None and (source / "preprocessor_config.json").is_file():
            processor = json.loads((source / "preprocessor_config.json").read_text())
            mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
        self.preprocessing = ImagePreprocessing(size=(side, side), mean=tuple(mean), std=tuple(std))

        if source is not None:
            self.load(source, pretrained)

    def load(self, source: Path, pretrained: str) -> None:
        load_strict(self, read_tensors(str(source), PREFIXES), "", pretrained)
        log.info("encoder=blip2: vision model, Q-Former and queries loaded from %s", pretrained)

    @property
    def grid_size(self) -> tuple[int, int]:
        return 1, self.config.num_query_tokens

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if tuple(pixel_values.shape[-2:]) != self.preprocessing.size:
            raise ValueError(
                f"encoder=blip2 expects images of {self.preprocessing.size}, got {tuple(pixel_values.shape[-2:])}"
            )
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        queries = self.query_tokens.expand(pixel_values.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
