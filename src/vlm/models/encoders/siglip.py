"""SigLIP through timm: patch tokens of any timm SigLIP ViT, without its attention-pool head.

    (B, 3, H, W) -> patch embedding + learned positions -> blocks[: depth + feature_layer + 1]
    -> final norm (last layer only) -> (B, H/p * W/p, width)

The model is timm's own (`timm.create_model(model_name, **model_kwargs)`); this module only picks the
tokens, the weights and the preprocessing. Weights come from `pretrained`:

- a local file (`.safetensors`, `.bin`, `.pt`, `.pth`) or a directory holding one of `WEIGHT_FILES`:
  timm's layout (`model.safetensors`, as `timm.models.save_for_hf` writes it) or open_clip's (the timm
  trunk under `visual.trunk.`, text tower ignored);
- a Hub repo id (`timm/ViT-B-16-SigLIP-512`), or a timm pretrained tag (`webli`) that names one: fetched
  only when online, or found in the Hub cache.

Every source goes through the same path: timm's checkpoint filter (open_clip prefix, position table
resampled to `image_size`), then strict loading of every tensor of the model, head included, before
the head is removed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from vlm.contracts import ImagePreprocessing
from vlm.models.encoders.base import VisionEncoder
from vlm.models.pretrained import download_file, load_strict, read_checkpoint_file

log = logging.getLogger(__name__)

# what a checkpoint directory may hold, in order of preference
WEIGHT_FILES = (
    "model.safetensors",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
)


class SigLIPEncoder(VisionEncoder):
    """A timm SigLIP ViT's patch tokens at `image_size` (default: the model's own resolution).

    `feature_layer=-1` takes the last block after the final norm; `-2` the penultimate block's output
    without it (LLaVA's choice), and so on; the blocks after it are dropped, not run.
    `model_kwargs` go to `timm.create_model` (e.g. `depth`, `embed_dim` for test sizes). `pretrained`: the
    weights (module docstring; the default `webli` is timm's tag for the SigLIP ViTs), None for fresh ones.
    """

    def __init__(
        self,
        model_name: str = "vit_base_patch16_siglip_512",
        image_size: int | tuple[int, int] | None = None,
        pretrained: str | None = "webli",
        feature_layer: int = -1,
        resize: str = "resize",
        model_kwargs: Mapping | None = MappingProxyType({}),
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if model_name not in timm.list_models():
            siglips = ", ".join(timm.list_models("vit_*siglip*"))
            raise ValueError(f"encoder.model_name={model_name!r} is not a timm model; SigLIP ViTs: {siglips}")
        kwargs = dict(model_kwargs or {})
        if image_size is not None:
            kwargs["img_size"] = image_size
        self.model_name = model_name
        self.trunk = timm.create_model(model_name, pretrained=False, **kwargs)
        if not isinstance(self.trunk, VisionTransformer):
            raise ValueError(
                f"encoder=siglip takes timm VisionTransformer models; {model_name} is a "
                f"{type(self.trunk).__name__}"
            )
        if pretrained:
            self.load(pretrained)

        depth = len(self.trunk.blocks)
        if not -depth <= feature_layer <= -1:
            raise ValueError(
                f"encoder.feature_layer={feature_layer} must be in [-{depth}, -1] ({depth} blocks)"
            )
        self.feature_layer = feature_layer
        # drops the attention-pool head, the blocks after `feature_layer` and, below the last, the norm
        self.trunk.prune_intermediate_layers(
            indices=[depth + feature_layer], prune_norm=feature_layer != -1, prune_head=True
        )
        self.trunk.set_grad_checkpointing(activation_checkpointing)
        self.block_classes = (type(self.trunk.blocks[0]),)

        data = timm.data.resolve_model_data_config(self.trunk)
        self.preprocessing = ImagePreprocessing(
            size=tuple(self.trunk.patch_embed.img_size),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            resize=resize,
        )
        self.output_dim = self.trunk.embed_dim

    def load(self, pretrained: str) -> None:
        file = weights_file(self.model_name, pretrained)
        state = checkpoint_filter_fn(read_checkpoint_file(file), self.trunk)
        load_strict(self.trunk, state, "", str(file))
        log.info("encoder=siglip: %s weights loaded from %s", self.model_name, file)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.trunk.patch_embed.grid_size)

    @property
    def variant(self) -> str:
        return self.model_name

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if tuple(pixel_values.shape[-2:]) != self.preprocessing.size:
            raise ValueError(
                f"encoder=siglip ({self.model_name}) expects images of {self.preprocessing.size}, "
                f"got {tuple(pixel_values.shape[-2:])}"
            )
        tokens = self.trunk.forward_features(pixel_values)
        return tokens[:, self.trunk.num_prefix_tokens :]


def weights_file(model_name: str, pretrained: str) -> Path:
    """The checkpoint file that `pretrained` names: a file, a directory, a Hub id or a timm tag."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"encoder.pretrained={pretrained}: none of {', '.join(WEIGHT_FILES)} in it")
    if "/" in pretrained:
        return download_file(pretrained, WEIGHT_FILES)
    tags = [name.split(".", 1)[1] for name in timm.list_pretrained(f"{model_name}.*")]
    if pretrained not in tags:
        raise FileNotFoundError(
            f"encoder.pretrained={pretrained!r} is neither a local path nor a Hub id, and timm has no tag "
            f"{pretrained!r} for {model_name} (its tags: {', '.join(tags) or 'none'})"
        )
    cfg = timm.models.get_pretrained_cfg(f"{model_name}.{pretrained}")
    names = dict.fromkeys((*WEIGHT_FILES[:2], cfg.hf_hub_filename or WEIGHT_FILES[0], *WEIGHT_FILES[2:]))
    return download_file(cfg.hf_hub_id, tuple(names))
