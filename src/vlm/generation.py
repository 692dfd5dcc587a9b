"""Batched decoding for a VisionLanguageModel: left padding, KV cache, greedy or nucleus sampling."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlm.models.vlm import VisionLanguageModel


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: VisionLanguageModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New token ids per prompt (stop token excluded). Prompts are left-padded: (B, T) ids and mask."""
    llm = model.llm
    stop = torch.tensor(
        list(stop_ids if stop_ids is not None else [model.tokenizer.eos_id]), device=input_ids.device
    )
    batch_size = input_ids.shape[0]
    embeds = model.embed_inputs(input_ids, pixel_values)
    mask = attention_mask.long()
    cache = llm.new_kv_cache(batch_size, embeds.shape[1] + max_new_tokens) if use_cache else None
    positions = model.position_ids(input_ids, mask)  # None: the LLM counts positions itself
    logits = llm(embeds, attention_mask=mask, kv_cache=cache, position_ids=positions)[:, -1]

    outputs = torch.zeros(batch_size, 0, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)
        token = token.masked_fill(finished, int(stop[0]))
        outputs = torch.cat([outputs, token[:, None]], dim=1)
        finished |= torch.isin(token, stop)
        if finished.all():
            break
        mask = torch.cat([mask, mask.new_ones(batch_size, 1)], dim=1)
        token_embeds = llm.embed(token[:, None])
        new_position = None if positions is None else positions[:, -1:] + 1
        if use_cache:
            logits = llm(token_embeds, attention_mask=mask, kv_cache=cache, position_ids=new_position)[:, -1]
            positions = new_position
        else:
            embeds = torch.cat([embeds, token_embeds], dim=1)
            positions = None if positions is None else torch.cat([positions, new_position], dim=1)
            logits = llm(embeds, attention_mask=mask, position_ids=positions)[:, -1]

    stop_set = set(stop.tolist())
    results = []
    for row in outputs.tolist():
        ends = [i for i, t in enumerate(row) if t in stop_set]
        results.append(row[: ends[0]] if ends else row)
    return results
