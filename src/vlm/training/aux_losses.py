"""Auxiliary training losses (used in training only; generation never sees them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm import IGNORE_INDEX
from vlm.contracts import Batch
from vlm.models.llms.tokenizer import ByteTokenizer

UNITS = ("bytes", "llm")
BYTE_CLASSES = 257  # UTF-8 byte values 0-255, then 256: the CTC blank and the chunk loss's padding


def answer_targets(batch: Batch, eos_id: int, loss_name: str) -> list[torch.Tensor]:
    """What each image of the batch reads, as token ids without end-of-sequence: each page's own text
    when the batch gives it (`image_text_ids`, one per image: the pages of `data=longdoc`), else each
    sample's answer (rendered-text OCR: one image per sample, its text the answer)."""
    if "image_text_ids" in batch:
        texts = batch["image_text_ids"]
        if len(texts) != len(batch["pixel_values"]):
            raise ValueError(f"{len(texts)} image texts for {len(batch['pixel_values'])} images")
        return [ids.to(batch["pixel_values"].device) for ids in texts]
    if not bool((batch["images_per_sample"] == 1).all()):
        raise ValueError(
            f"{loss_name} > 0 needs exactly one image per sample (rendered-text OCR), or the text of every "
            "image (batch['image_text_ids'], as data=longdoc gives)"
        )
    labels = batch.get("sample_labels", batch["labels"])  # a packed batch keeps each sample's own row
    is_answer = (labels != IGNORE_INDEX) & (labels != eos_id)
    return [row[mask] for row, mask in zip(labels, is_answer, strict=True)]


def reading_units(units: str, tokenizer) -> tuple[bool, int, int]:
    """(as bytes, classes, blank/padding id) of the auxiliary losses' targets in `units`
    (`loss.aux_units`): `bytes`, the UTF-8 bytes of the text whatever the LLM's tokenizer; `llm`, the
    LLM's own token ids. With the byte tokenizer both are its ids (its runs keep the classes they were
    measured with)."""
    if units not in UNITS:
        raise ValueError(f"loss.aux_units={units!r}: expected one of {', '.join(UNITS)}")
    if units == "llm" or isinstance(tokenizer, ByteTokenizer):
        return False, tokenizer.vocab_size, tokenizer.pad_id
    return True, BYTE_CLASSES, BYTE_CLASSES - 1


def reading_targets(batch: Batch, tokenizer, loss_name: str, as_bytes: bool) -> list[torch.Tensor]:
    """`answer_targets` as the LLM's ids, or (`as_bytes`) as the UTF-8 bytes of the text they spell."""
    targets = answer_targets(batch, tokenizer.eos_id, loss_name)
    if not as_bytes:
        return targets
    return [
        torch.tensor(
            list(tokenizer.decode(ids.tolist()).encode("utf-8")), dtype=torch.long, device=ids.device
        )
        for ids in targets
    ]


class CTCHead(nn.Module):
    """CTC over the encoder's feature columns, read left to right, against the answer's tokens.

    Trained from scratch, a decoder first learns the language prior, and its gradient pushes the
    encoder towards an image-independent output, after which the decoder never learns to read
    (measured: docs/results.md, "Why the CTC loss"). A CTC loss on the encoder's columns (as in hybrid CTC/attention
    recognisers) keeps its features about the characters from the first step. Each column emits
    `frames_per_column` CTC frames, so a line can hold more characters than the grid has columns.
    Single-line images only (a line of OCR, or a one-line page of `data=longdoc`). Targets in `units`
    (`reading_units`): by default the text's bytes, so a BPE LLM's encoder still learns characters.
    """

    def __init__(
        self, token_dim: int, rows: int, tokenizer, frames_per_column: int = 4, units: str = "bytes"
    ) -> None:
        super().__init__()
        self.frames_per_column, self.tokenizer = frames_per_column, tokenizer
        self.as_bytes, self.vocab_size, self.blank = reading_units(units, tokenizer)
        self.proj = nn.Linear(token_dim * rows, frames_per_column * self.vocab_size)

    def loss(self, tokens: torch.Tensor, grid: tuple[int, int], batch: Batch) -> torch.Tensor:
        """CTC loss of tokens (B, rows*cols, D) on a (rows, cols) grid against the answers."""
        rows, cols = grid
        B, _, D = tokens.shape
        columns = tokens.view(B, rows, cols, D).permute(0, 2, 1, 3).reshape(B, cols, rows * D)
        frames = self.proj(columns).view(B, cols * self.frames_per_column, self.vocab_size)
        log_probs = frames.float().log_softmax(-1).transpose(0, 1)  # (T, B, V)
        targets = reading_targets(batch, self.tokenizer, "loss.ctc_weight", self.as_bytes)
        target_lengths = torch.tensor([len(t) for t in targets])
        input_lengths = torch.full((B,), log_probs.shape[0], dtype=torch.long)
        return F.ctc_loss(
            log_probs, torch.cat(targets), input_lengths, target_lengths, blank=self.blank, zero_infinity=True
        )


class ChunkHead(nn.Module):
    """Vision token j predicts answer tokens [k*j, k*j + k) in reading order (pad past the end).

    A dense target for every vision token that makes the layout of the tokens canonical: whatever the
    font and its width, token j holds the j-th chunk of k tokens of the text. The decoder then reads
    answer token i from vision token i // k, which (with `model.vision_position_stride` = k) sits at
    a fixed distance behind it (what it did for the default recipe: docs/results.md, "How the recipe got
    there"). Targets: see `answer_targets`, in `units` as for `CTCHead` (k bytes per token by
    default).
    """

    def __init__(self, token_dim: int, chunk_tokens: int, tokenizer, units: str = "bytes") -> None:
        super().__init__()
        self.chunk_tokens, self.tokenizer = chunk_tokens, tokenizer
        self.as_bytes, self.vocab_size, self.pad_id = reading_units(units, tokenizer)
        self.proj = nn.Linear(token_dim, chunk_tokens * self.vocab_size)

    def loss(self, vision: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Cross-entropy of vision tokens (B, M, D) against the answers, chunk by chunk."""
        answers = reading_targets(batch, self.tokenizer, "loss.chunk_weight", self.as_bytes)
        B, M, _ = vision.shape
        slots = M * self.chunk_tokens
        targets = torch.full((B, slots), self.pad_id, dtype=torch.long, device=vision.device)
        for row, answer in enumerate(answers):
            targets[row, : min(len(answer), slots)] = answer[:slots]
        logits = self.proj(vision).view(B, slots, self.vocab_size)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
