"""The LightningModule: builds the model from the run config, applies the stage, trains and evaluates."""

from __future__ import annotations

import logging
from collections import Counter

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.text import CharErrorRate

from vlm import IGNORE_INDEX
from vlm.contracts import IN_PROMPT, Batch, context_inputs
from vlm.generation import GenerationConfig, generate
from vlm.models.vlm import VisionLanguageModel
from vlm.training.aux_losses import ChunkHead, CTCHead
from vlm.training.optim import param_groups, warmup_cosine

log = logging.getLogger(__name__)
PARTS = ("encoder", "resampler", "projector", "llm")


def apply_stage(model: VisionLanguageModel, stage: DictConfig) -> list[str]:
    """Freeze what the stage says; return the names of the frozen modules."""
    frozen = [part for part in PARTS if not stage.train[part]]
    if not model.encoder.trainable and "encoder" not in frozen:
        log.info("%s stays frozen (encoder.trainable=false)", model.encoder.option)
        frozen.insert(0, "encoder")
    frozen += list(stage.get("freeze", []))
    if stage.get("freeze_encoder_low_level", False):
        frozen += [f"encoder.{name}" for name in model.encoder.low_level_modules]
    for name in frozen:
        try:
            module = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(
                f"stage {stage.name!r} freezes {name!r}, which the model does not have"
            ) from error
        module.requires_grad_(False)
    return frozen


class VLMModule(L.LightningModule):
    """Trains a VisionLanguageModel; `cfg` is the whole resolved run config (saved in checkpoints)."""

    def __init__(self, cfg: dict | DictConfig) -> None:
        super().__init__()
        cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True)})
        self.cfg = OmegaConf.create(self.hparams["cfg"])
        self.model: VisionLanguageModel = instantiate(self.cfg.model)
        self.frozen = apply_stage(self.model, self.cfg.stage)
        aux_units = self.cfg.loss.get("aux_units", "llm")  # checkpoints from before it: llm
        self.ctc_head = (
            CTCHead(
                self.model.encoder.output_dim,
                self.model.encoder.grid_size[0],
                self.model.tokenizer,
                self.cfg.loss.ctc_frames_per_column,
                aux_units,
            )
            if self.cfg.loss.ctc_weight > 0 and self._ctc_applies()
            else None
        )
        self.chunk_head = (
            ChunkHead(
                self.model.llm.hidden_size,
                self.cfg.loss.chunk_tokens,
                self.model.tokenizer,
                aux_units,
            )
            if self.cfg.loss.chunk_weight > 0 and self._chunk_applies()
            else None
        )
        self.skipped: Counter = Counter()  # bad samples per reason
        self.sources: Counter = Counter()  # training samples per data source
        self.val_cer = CharErrorRate()  # corpus CER: edits and reference characters summed, then divided
        self.val_exact_match = MeanMetric()
        self.train()  # Lightning keeps each module's mode as it finds it: frozen parts start in eval

    def _ctc_applies(self) -> bool:
        """The CTC loss reads a trainable encoder's grid columns; say so when it cannot apply."""
        encoder = self.model.encoder
        if self.model.context != "vision":
            log.warning(
                "loss.ctc_weight=%s is not applied: context=%s does not run the encoder",
                self.cfg.loss.ctc_weight,
                self.model.context,
            )
            return False
        why = (
            "gives no spatial grid"
            if not encoder.spatial
            else "is frozen"
            if "encoder" in self.frozen
            else "tiles its images"
            if encoder.preprocessing.tiling is not None
            else ""
        )
        if why:
            log.warning(
                "loss.ctc_weight=%s is not applied: %s %s", self.cfg.loss.ctc_weight, encoder.option, why
            )
        return not why

    def _chunk_applies(self) -> bool:
        """The chunk loss reads the vectors in the placeholder positions, which text in the prompt lacks; a
        context arm whose vectors have a layout of their own opts out (`context.chunk_loss: false`)."""
        if not (self.cfg.get("context") or {}).get("chunk_loss", True):
            log.warning(
                "loss.chunk_weight=%s is not applied: context=%s lays its vectors out its own way "
                "(context.chunk_loss: false)",
                self.cfg.loss.chunk_weight,
                self.model.context,
            )
            return False
        if self.model.context in IN_PROMPT:
            log.warning(
                "loss.chunk_weight=%s is not applied: context=%s puts token ids, not vectors, in the positions",
                self.cfg.loss.chunk_weight,
                self.model.context,
            )
            return False
        return True

    # -- stage ----------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> VLMModule:
        """Frozen modules stay in eval mode (dropout off, norms fixed) whatever the caller asks."""
        super().train(mode)
        for name in self.frozen:
            self.model.get_submodule(name).eval()
        return self

    def configure_optimizers(self):
        optim, stage = self.cfg.optim, self.cfg.stage
        parts = {p: getattr(self.model, p) for p in PARTS if p not in self.frozen}
        lrs = {p: optim.lr * stage.lr_scale[p] for p in parts}
        if self.ctc_head is not None:
            parts["ctc_head"], lrs["ctc_head"] = self.ctc_head, optim.lr
        if self.chunk_head is not None:
            parts["chunk_head"], lrs["chunk_head"] = self.chunk_head, optim.lr
        groups = param_groups(parts, lrs, optim.weight_decay)
        fused = self.device.type in ("cuda", "cpu")  # one kernel for all tensors (CPU too, since torch 2.4)
        optimizer = torch.optim.AdamW(groups, betas=tuple(optim.betas), eps=optim.eps, fused=fused)
        total = (
            self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        )
        scheduler = warmup_cosine(optimizer, optim.warmup_steps, int(total), optim.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- training -------------------------------------------------------------------------------
    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its parts: next-token cross-entropy on the answer (+ the auxiliary losses), all
        from one forward of the model."""
        input_ids, labels, cfg = batch["input_ids"], batch["labels"], self.cfg.loss
        if self.training and cfg.context_dropout > 0:
            # word dropout (Bowman et al., 2016): hide answer tokens from the decoder's input so it
            # cannot lean on the language prior alone and has to read the image
            hidden = torch.rand(labels.shape, device=labels.device) < cfg.context_dropout
            input_ids = input_ids.masked_fill(hidden & (labels != IGNORE_INDEX), self.model.tokenizer.pad_id)
        # right padding: causal is enough; a packed batch says where its samples start (segment_ids)
        out = self.model(
            input_ids, labels=labels, segment_ids=batch.get("segment_ids"), **context_inputs(batch)
        )
        parts = {"lm": out.loss}
        if cfg.get("prompt_lm_weight", 0.0) > 0:
            parts["prompt_lm"] = self.prompt_lm(out.logits, batch)
        features, vectors = out.context.features, out.context.vectors
        if self.ctc_head is not None and features is not None:
            parts["ctc"] = self.ctc_head.loss(features, self.model.encoder.grid_size, batch)
        if self.chunk_head is not None and vectors is not None:
            parts["chunk"] = self.chunk_head.loss(vectors, self.context_reading(batch, vectors))
        weights = {
            "lm": 1.0,
            "prompt_lm": cfg.get("prompt_lm_weight", 0.0),
            "ctc": cfg.ctc_weight,
            "chunk": cfg.chunk_weight,
        }
        return sum(weights[name] * value for name, value in parts.items()), parts

    def prompt_lm(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Next-token cross-entropy on the prompt's own text tokens (`loss.prompt_lm_weight`): what a
        language model learns from the document in a text view; image placeholders, vision tokens,
        padding and the answer are not targets."""
        tokenizer, input_ids = self.model.tokenizer, batch["input_ids"]
        text = (
            batch["attention_mask"].bool()
            & (batch["labels"] == IGNORE_INDEX)
            & (input_ids != tokenizer.image_token_id)
            & (input_ids != tokenizer.pad_id)
        )
        if "segment_ids" in batch:  # a packed row: a sample's first token is no target of the one before
            segments = batch["segment_ids"]
            text[:, 1:] &= segments[:, 1:] == segments[:, :-1]
        targets = F.pad(input_ids.masked_fill(~text, IGNORE_INDEX)[:, 1:], (0, 1), value=IGNORE_INDEX)
        if not (targets != IGNORE_INDEX).any():
            return logits.sum() * 0.0  # a batch with no prompt text (a vision view): no loss, same graph
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)

    def _count_skipped(self, batch: Batch) -> None:
        """Running totals of skipped samples and of samples per data source, summed over ranks."""
        self.skipped.update(batch.get("skipped", {}))
        self.sources.update(batch.get("sources", {}))
        # the same keys on every rank at every step: a synced value logged by one rank only hangs DDP
        self.log("data/skipped", float(sum(self.skipped.values())), reduce_fx="sum", sync_dist=True)
        for name, count in sorted(self.sources.items()):
            self.log(f"data/{name}_samples", float(count), reduce_fx="sum", sync_dist=True)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, parts = self.loss(batch)
        self._count_skipped(batch)
        for name, value in parts.items():
            self.log(f"train/loss_{name}", value, batch_size=len(batch["keys"]))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["keys"]))
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    @staticmethod
    def context_reading(batch: Batch, vectors: torch.Tensor) -> Batch:
        """The batch as the chunk loss reads a text arm's vectors (`vlm.training.aux_losses.answer_targets`):
        each row stands for one image and reads the text it holds (`context_ids`), as the vision arm's pages
        read their `image_text_ids` (for an OCR sample, its text is its answer: the one-image reading); the
        vectors stand in for the images that `answer_targets` counts the texts against."""
        if "context_ids" not in batch:
            return batch
        rows = [
            ids[mask.bool()] for ids, mask in zip(batch["context_ids"], batch["context_mask"], strict=True)
        ]
        return batch | {"image_text_ids": rows, "pixel_values": vectors}

    # -- evaluation -----------------------------------------------------------------------------
    def predict_text(self, batch: Batch, max_new_tokens: int) -> list[str]:
        """The batch's answers generated with the run's `generation:` settings, decoded."""
        gen = self.cfg.generation
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            no_repeat_ngram_size=gen.get("no_repeat_ngram_size", 0),
            ngram_window=gen.get("ngram_window"),
            ngram_exempt_ids=tuple(gen.get("ngram_exempt_ids") or ()),
        )
        ids = generate(
            self.model, batch["prompt_ids"], batch["prompt_mask"], config=config, **context_inputs(batch)
        )
        return [self.model.tokenizer.decode(row) for row in ids]

    def validation_step(self, batch: Batch, batch_idx: int) -> list[str] | None:
        """The decoded texts of the first `generation.val_batches` batches are scored (val/cer,
        val/exact_match: torchmetrics, summed over ranks) and returned for callbacks
        (tracking.ValidationSamples)."""
        batch_size = len(batch["keys"])
        self.log("val/loss", self.loss(batch)[1]["lm"], prog_bar=True, batch_size=batch_size, sync_dist=True)
        if batch_idx < self.cfg.generation.val_batches:
            predictions = self.predict_text(batch, self.cfg.generation.max_new_tokens)
            references = [answers[0] for answers in batch["answers"]]
            self.val_cer.update(predictions, references)
            matches = [float(p == r) for p, r in zip(predictions, references, strict=True)]
            self.val_exact_match.update(torch.tensor(matches, device=self.device))
            return predictions
        return None

    def on_validation_epoch_end(self) -> None:
        if self.val_cer.update_count:
            self.log("val/cer", self.val_cer.compute(), prog_bar=True)
            self.log("val/exact_match", self.val_exact_match.compute())
        self.val_cer.reset()
        self.val_exact_match.reset()

    def predict_step(self, batch: Batch, batch_idx: int) -> dict:
        """Generation for a benchmark (`vlm.eval.runner`): {"texts": {key: generated text}, "failed":
        [(key, why)] of the items that could not be read}. The batch carries its `max_new_tokens` (the
        benchmark's), else the run's `generation.max_new_tokens`."""
        texts = {}
        if batch["keys"]:
            max_new_tokens = batch.get("max_new_tokens") or self.cfg.generation.max_new_tokens
            texts = dict(zip(batch["keys"], self.predict_text(batch, max_new_tokens), strict=True))
        return {"texts": texts, "failed": list(batch.get("failed", []))}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """A tokenizer kept in a file of its own (BPE) is saved with the weights, as a JSON string, so the
        checkpoint alone rebuilds the model (vlm.training.checkpointing.load_module)."""
        to_json = getattr(self.model.tokenizer, "to_json", None)
        if to_json is not None:
            checkpoint["tokenizer"] = to_json()


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    return total, sum(p.numel() for p in module.parameters() if p.requires_grad)
