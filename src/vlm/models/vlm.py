"""The composed model: encoder -> resampler -> projector -> placeholders in the LLM's input."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlm import IGNORE_INDEX
from vlm.contracts import COMPRESSED, CONTEXTS, IN_PROMPT, TiledViews
from vlm.models.encoders.base import VisionEncoder
from vlm.models.llms.gpt import segment_positions
from vlm.models.projectors import WithLayout
from vlm.models.resamplers import Resampler

log = logging.getLogger(__name__)

POSITION_UNITS = ("token", "byte")  # what advances the LLM's position by one for text: a token or a byte


class PlaceholderCountError(ValueError):
    """The token sequence has a different number of `<image>` placeholders than vision embeddings."""


class CompositionError(ValueError):
    """The parts do not fit together (e.g. pixel shuffle on a grid its factor does not divide)."""


@contextmanager
def composition_check(encoder: VisionEncoder):
    """Re-raise a part's ValueError with the encoder's option, input size, grid and width."""
    try:
        yield
    except ValueError as error:
        raise CompositionError(f"{encoder.describe()} cannot feed this resampler: {error}") from error


@dataclass
class Context:
    """What fills the `<image>` positions: `vectors` (N, K, D_llm), or (positions, D_llm) for tiled views;
    `features`, the encoder's output they came from (None for a text arm's compressed text)."""

    vectors: torch.Tensor | None = None
    features: torch.Tensor | TiledViews | None = None


@dataclass
class VLMOutput:
    """One forward: logits (B, T, V); the next-token loss when labels were given; the context it read
    (what the auxiliary losses need)."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    context: Context


class VisionLanguageModel(nn.Module):
    """encoder(views) -> resampler -> projector -> scattered into the `<image>` positions -> llm.

    `resampler` and `projector` are factories (Hydra `_partial_`) completed here with the widths of the
    parts around them, so any combination composes; an impossible one fails now, not mid-forward.
    When the encoder asks for DeepSeek-OCR's layout (`encoder.layout_tokens`), the projector is wrapped
    in `projectors.WithLayout`: a learned newline after every row of an image's vision tokens and a
    separator after the image.

    `context` chooses what fills the K = `vision_tokens_per_image` positions (`vlm.models.context`):
    the image (`vision`), or the text the image shows. For `text_meanpool` and `text_conv`,
    `context_compressor` (a factory, built with the LLM width and K) takes the resampler's place and
    feeds the projector; `truncate` and `full_text` put token ids in the prompt. In the text arms the
    encoder and resampler only set K and stay frozen, as do the projector's weights when it is unused.

    `options` ({group: option}, from Hydra's `runtime.choices` in conf/train.yaml's `model.options`) name
    the parts in messages as the command line does (`encoder=siglip`); without them, by class.
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        resampler: Callable[..., Resampler],
        projector: Callable[..., nn.Module],
        llm: nn.Module,
        vision_position_stride: int = 1,
        text_position_unit: str | None = None,
        context: str = "vision",
        context_compressor: Callable[..., nn.Module] | None = None,
        options: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        options = dict(options or {})  # group -> the option chosen (Hydra's runtime.choices), for messages
        if "encoder" in options:
            encoder.option = f"encoder={options['encoder']}"
        with composition_check(encoder):
            self.resampler = resampler(in_dim=encoder.output_dim)
            if "resampler" in options:
                self.resampler.option = f"resampler={options['resampler']}"
            if self.resampler.needs_spatial_grid and not encoder.spatial:
                raise ValueError(
                    f"{self.resampler.option} folds or pools neighbouring patches of a spatial grid, which "
                    f"this encoder does not give; use resampler=identity, perceiver"
                )
            self.vision_grid = self.resampler.output_grid(encoder.grid_size)
            tiling = encoder.preprocessing.tiling
            if (
                tiling is not None
                and self.resampler.output_grid(tiling.tokens_per_tile) != tiling.tokens_per_tile
            ):
                # the data processor counts a tile's placeholders from the encoder's tiling alone
                raise ValueError(
                    f"a tiling encoder needs a resampler that keeps a tile's {tiling.tokens_per_tile} "
                    f"token grid (resampler=identity), but {self.resampler.option} changes it"
                )
        if context not in CONTEXTS:
            raise ValueError(f"model.context={context!r}: expected one of {', '.join(CONTEXTS)}")
        if (context in COMPRESSED) != (context_compressor is not None):
            raise ValueError(
                f"model.context={context} needs a context_compressor exactly when it is one of "
                f"{', '.join(COMPRESSED)}; use the context= config group"
            )
        self.context = context
        if context_compressor is not None:
            self.resampler = context_compressor(in_dim=llm.hidden_size, tokens=self.vision_tokens_per_image)
            self.resampler.option = f"context={context}"
        projection = projector(in_dim=self.resampler.out_dim, out_dim=llm.hidden_size)
        layout = encoder.layout_tokens and context == "vision"
        self.projector = WithLayout(projection, llm.hidden_size) if layout else projection
        self.llm = llm
        for name in self.unused_parts:
            self.get_submodule(name).requires_grad_(False)
        if vision_position_stride < 1:
            raise ValueError(f"model.vision_position_stride must be >= 1, got {vision_position_stride}")
        self.vision_position_stride = vision_position_stride
        text_position_unit = text_position_unit or getattr(llm, "position_unit", "token")
        if text_position_unit not in POSITION_UNITS:
            raise ValueError(
                f"model.text_position_unit={text_position_unit!r}: expected one of {', '.join(POSITION_UNITS)}"
            )
        self.text_position_unit = text_position_unit
        self.register_buffer("text_position_steps", self._text_steps(), persistent=False)
        self.load_companion_weights(encoder.companion_weights())

    @property
    def unused_parts(self) -> tuple[str, ...]:
        """The parts this context arm never runs (frozen)."""
        if self.context in COMPRESSED:
            return ("encoder",)
        return ("encoder", "resampler", "projector") if self.context in IN_PROMPT else ()

    def describe(self) -> str:
        """What each part makes of an image, for the start-up log."""
        if self.context != "vision":
            return self._describe_text_context()
        rows, cols = self.vision_grid
        resampled = f"{rows}x{cols} grid" if self.encoder.spatial else f"{rows * cols} tokens"
        extra = (
            " (with DeepSeek-OCR's row newlines and image separator)" if self.encoder.layout_tokens else ""
        )
        return "\n".join(
            [
                f"  {self.encoder.describe()}",
                f"  {self.resampler.option} -> {resampled} of width {self.resampler.out_dim}",
                f"  projector -> width {self.llm.hidden_size}",
                f"  = {self.vision_tokens_per_image} vision tokens per image{extra}",
            ]
        )

    def _describe_text_context(self) -> str:
        K, width = self.vision_tokens_per_image, self.llm.hidden_size
        unused = ", ".join(self.unused_parts)
        lines = [f"  context={self.context}: the text the image shows, as LLM tokens of width {width}"]
        if self.context in IN_PROMPT:
            kept = "its first K" if self.context == "truncate" else "all its"
            lines.append(f"  {kept} token ids in place of the placeholders")
        else:
            lines.append(f"  {type(self.resampler).__name__} -> K tokens of width {self.resampler.out_dim}")
            lines.append(f"  projector -> width {width}")
        positions = "its token count" if self.context == "full_text" else f"K = {K}"
        lines.append(f"  = {positions} positions per <image>; {unused} unused (frozen)")
        if self.context != "full_text":
            lines.append(f"  K from {self.encoder.describe()}")
        return "\n".join(lines)

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def vision_tokens_per_image(self) -> int:
        """Placeholders per image (a tiling encoder: per untiled image; tiles add
        `encoder.preprocessing.tiling.local_positions(tile_grid)`)."""
        rows, cols = self.vision_grid
        if not self.encoder.layout_tokens:
            return rows * cols
        return rows * (cols + 1) + 1

    def load_companion_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load the encoder checkpoint's projector and layout vectors where name and shape match."""
        own = dict(self.named_parameters())
        fresh = {
            name: f"checkpoint {tuple(value.shape)}, "
            + (f"model {tuple(own[name].shape)}" if name in own else "not in this model")
            for name, value in weights.items()
            if name not in own or own[name].shape != value.shape
        }
        loaded = sorted(set(weights) - set(fresh))
        with torch.no_grad():
            for name in loaded:
                own[name].copy_(weights[name])
        if loaded:
            log.info("loaded from the encoder's checkpoint: %s", ", ".join(loaded))
        if fresh:
            log.warning(
                "freshly initialised, not loaded from the encoder's checkpoint: %s",
                "; ".join(f"{name} ({why})" for name, why in sorted(fresh.items())),
            )

    def encode_images(self, pixel_values: torch.Tensor | TiledViews) -> torch.Tensor:
        """(N_images, 3, H, W) -> (N_images, vision_tokens_per_image, llm width); tiled views ->
        (all their positions, llm width), image after image."""
        return self.encode(pixel_values).vectors

    def encode_context(self, context_ids: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """Right-padded token ids of the texts (N, L), one row per `<image>` in placeholder order (sample
        after sample, image after image) -> compressed and projected (N, K, D_llm), which `embed_inputs`
        puts in the placeholders in that order, K per row."""
        lengths = context_mask.sum(-1)
        if bool((lengths == 0).any()):
            empty = (lengths == 0).nonzero().flatten().tolist()
            raise ValueError(f"context rows {empty} hold no tokens: every <image> needs its text")
        embeds = self.llm.embed(context_ids).float()  # the LLM's own table, shared: (N, L, D_llm)
        tokens = self.resampler(embeds, lengths)  # the compressor: (N, K, D)
        if tokens.shape[1] != self.vision_tokens_per_image:
            raise PlaceholderCountError(
                f"{self.resampler.option} gave {tokens.shape[1]} tokens per text, not "
                f"K = {self.vision_tokens_per_image}"
            )
        return self.projector(tokens)

    def project(self, features: torch.Tensor | TiledViews) -> torch.Tensor:
        """Encoder features (N, rows*cols, D_enc) -> resampled, projected, laid out (N, M, D_llm)."""
        if isinstance(features, TiledViews):
            return self._project_tiled(features)
        tokens = self.projector(self.resampler(features, self.encoder.grid_size))  # (N, rows*cols, D)
        if not self.encoder.layout_tokens:
            return tokens
        N, _, D = tokens.shape
        rows = self.projector.close_rows(tokens.view(N, *self.vision_grid, D))  # (N, rows*(cols+1), D)
        return self.projector.close_image(rows)  # (N, rows*(cols+1) + 1, D)

    def _project_tiled(self, features: TiledViews) -> torch.Tensor:
        """Per image, as DeepSeek-OCR lays out gundam mode: its tiles joined into one token grid, then
        the global view, each row closed by a newline, then the separator -> (positions, D_llm)."""
        tiling = self.encoder.preprocessing.tiling
        global_tokens = self.projector(self.resampler(features.global_views, self.encoder.grid_size))
        tile_tokens = self.projector(self.resampler(features.tiles, tiling.tokens_per_tile))
        D = global_tokens.shape[-1]
        token_rows, token_cols = tiling.tokens_per_tile
        layout = self.encoder.layout_tokens
        close_rows = self.projector.close_rows if layout else lambda grid: grid.flatten(0, 1)
        images, first_tile = [], 0
        for image, (rows, cols) in enumerate(features.tile_grids):
            pieces = []
            if rows * cols:
                tiles = tile_tokens[first_tile : first_tile + rows * cols]
                first_tile += rows * cols
                # (rows*cols tiles, r*c, D) -> one (rows*r, cols*c, D) grid
                joined = tiles.view(rows, cols, token_rows, token_cols, D).permute(0, 2, 1, 3, 4)
                pieces.append(close_rows(joined.reshape(rows * token_rows, cols * token_cols, D)))
            pieces.append(close_rows(global_tokens[image].view(*self.vision_grid, D)))
            laid_out = torch.cat(pieces)
            images.append(self.projector.close_image(laid_out) if layout else laid_out)
        return torch.cat(images)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | TiledViews | None = None,
        vision: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with every `<image>` position replaced by a vision embedding, in order.

        Pass `pixel_values`, or `vision` when the images are already encoded: (N_images, M, D_llm), or
        (positions, D_llm) for tiled views, whose images differ in length.
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
        images = f"{vision.shape[0]} image(s)" if vision.dim() == 3 else "tiled images"
        vision = vision.reshape(-1, vision.shape[-1])
        if num_placeholders != vision.shape[0]:
            raise PlaceholderCountError(
                f"the token ids hold {num_placeholders} <image> placeholders but the {images} give "
                f"{vision.shape[0]} vision embeddings ({self.vision_tokens_per_image} per "
                f"{'untiled ' if self.encoder.preprocessing.tiling else ''}image)"
            )
        embeds = embeds.clone()
        embeds[is_placeholder] = vision.to(embeds.dtype)
        return embeds

    def encode(
        self,
        pixel_values: torch.Tensor | TiledViews | None = None,
        context_ids: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> Context:
        """The placeholders' vectors, the one way training, evaluation and generation get them: a text
        arm's compressed texts (`context_ids`, `context_mask`, one row per `<image>`), else the images
        encoded (keeping the encoder's features), else none (a text-only batch)."""
        if context_ids is not None:
            return Context(self.encode_context(context_ids, context_mask))
        if pixel_values is None or pixel_values.shape[0] == 0:
            return Context()
        if self.context != "vision":
            raise ValueError(
                f"model.context={self.context} reads the text the image shows, not pixels: give the "
                f"samples' context text (vlm.data.processing.SampleProcessor with context={self.context})"
            )
        features = self.encoder(pixel_values)
        return Context(self.project(features), features)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | TiledViews | None = None,
        attention_mask: torch.Tensor | None = None,
        vision: torch.Tensor | None = None,
        context_ids: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> VLMOutput:
        """The model, one forward: the context encoded (`encode`; or `vision`, vectors already computed),
        placed in the `<image>` positions, the LLM run. `labels` (B, T), aligned with `input_ids` and
        IGNORE_INDEX where nothing is predicted, give the loss: cross-entropy of each position's logits
        against the next label. `segment_ids` (B, T): rows packed with several samples
        (`vlm.data.processing.PackingCollator`), each sample's positions counted from its own start and
        its attention kept to itself; no position predicts the next sample's first token."""
        context = (
            Context(vision) if vision is not None else self.encode(pixel_values, context_ids, context_mask)
        )
        embeds = self.embed_inputs(input_ids, vision=context.vectors)
        if segment_ids is None:
            positions = self.position_ids(input_ids, attention_mask)
            logits = self.llm(embeds, attention_mask=attention_mask, position_ids=positions)
        else:
            if not getattr(self.llm, "supports_packing", False):
                raise ValueError(
                    f"data.packing needs an LLM that attends within packed samples (llm=tiny or nanochat_*); "
                    f"{type(self.llm).__name__} does not"
                )
            logits = self.llm(
                embeds, position_ids=self.packed_position_ids(input_ids, segment_ids), segment_ids=segment_ids
            )
        loss = None
        if labels is not None:
            # shift the labels, not the logits: slicing the logits would copy them (and their gradient)
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            if segment_ids is not None:
                crossing = F.pad(segment_ids[:, 1:] != segment_ids[:, :-1], (0, 1), value=True)
                targets = targets.masked_fill(crossing, IGNORE_INDEX)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return VLMOutput(logits, loss, context)

    def packed_position_ids(self, input_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor | None:
        """`position_ids` of packed rows: each segment's positions as that sample alone would get them;
        None when the LLM counts them itself (one per token, restarting at each segment)."""
        steps = self.position_steps(input_ids)
        if steps is None:
            return None
        starts = segment_positions(segment_ids, steps)  # where each token's own steps begin
        return starts + steps if self.text_position_steps is not None else starts

    def _text_steps(self) -> torch.Tensor | None:
        """How far each token id advances the position under `text_position_unit=byte` (its UTF-8 bytes);
        None for `token` (one each)."""
        if self.text_position_unit == "token":
            return None
        token_bytes = getattr(self.tokenizer, "token_bytes", None)
        if token_bytes is None:
            raise ValueError(
                f"model.text_position_unit=byte needs a tokenizer that knows each token's bytes (llm=tiny's); "
                f"{type(self.tokenizer).__name__} does not"
            )
        return torch.tensor([max(1, len(b)) for b in token_bytes()], dtype=torch.long)  # a special token: 1

    def position_steps(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """How far each token (B, T) advances the LLM's position: `vision_position_stride` for a vision
        token, 1 or (`text_position_unit=byte`) its UTF-8 bytes for text; None when all are 1."""
        steps = self.text_position_steps
        if self.vision_position_stride == 1 and steps is None:
            return None
        text = steps[input_ids.clamp(0, len(steps) - 1)] if steps is not None else torch.ones_like(input_ids)
        return torch.where(input_ids == self.tokenizer.image_token_id, self.vision_position_stride, text)

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """LLM positions (B, T) from `position_steps`, else None (the LLM counts real tokens itself).
        Padding takes no positions, so left padding shifts none.

        In tokens, each token sits where the tokens before it end. In bytes, where its own bytes end: the
        token that predicts the next one then sits a fixed distance behind the vision token holding the
        next one's first bytes, whatever its own length (with the byte tokenizer the two orders differ
        by one position for every token, so attention, which sees only distances, is the same)."""
        steps = self.position_steps(input_ids)
        if steps is None:
            return None
        if attention_mask is not None:
            steps = steps * attention_mask.long()
        ends = steps.cumsum(-1)
        return ends if self.text_position_steps is not None else ends - steps

    def next_position(self, positions: torch.Tensor | None, token: torch.Tensor):
        """The position (B, 1) of `token` (B, 1), fed after the tokens at `positions`, as `position_ids`
        would place it (in bytes: where its own bytes end; in tokens: one on); None when the LLM counts
        positions itself."""
        if positions is None:
            return None
        return positions[:, -1:] + (self.position_steps(token) if self.text_position_steps is not None else 1)
