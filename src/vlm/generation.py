"""Batched decoding for a VisionLanguageModel, the same for every LLM backbone.

Prompts are left-padded; the LLM runs once over them (prefill) and then one token per step against its
KV cache, so each step costs attention over the current length and nothing else grows with it: the
outputs and the attention mask live in buffers allocated once, and the no-repeat n-gram guard looks at
a fixed window. Greedy, temperature and top-p sampling; stop tokens; DeepSeek-OCR's no-repeat n-gram
guard against repetition loops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vlm.models.vlm import VisionLanguageModel


@dataclass
class GenerationConfig:
    """How to decode (`generation:` in the run config).

    `no_repeat_ngram_size` n > 0 forbids a token that would complete an n-gram already present in the
    last `ngram_window` tokens of the output (all of it when None), except tokens in `ngram_exempt_ids`
    (DeepSeek-OCR exempts table-cell tags, which legitimately repeat): its guard against loops on
    long pages.
    """

    max_new_tokens: int = 96
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop_ids: Sequence[int] | None = None  # None: the tokenizer's stop_ids
    no_repeat_ngram_size: int = 0
    ngram_window: int | None = None
    ngram_exempt_ids: Sequence[int] = field(default_factory=tuple)


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


def ban_repeated_ngrams(
    logits: torch.Tensor, outputs: torch.Tensor, n: int, window: int | None, exempt: torch.Tensor
) -> torch.Tensor:
    """Set to -inf the logits of every token that would complete an n-gram already in the last
    `window` tokens of `outputs` (B, L). Cost per step: O(window x n), whatever L is."""
    length = outputs.shape[1]
    if n <= 0 or length < n:
        return logits
    recent = outputs[:, -window:] if window else outputs
    grams = recent.unfold(1, n, 1)  # (B, G, n): every n-gram in the window
    prefix = outputs[:, length - n + 1 :]  # (B, n-1): the n-1 tokens just generated
    seen = (grams[..., :-1] == prefix[:, None]).all(-1)  # (B, G): n-grams that start with the prefix
    rows, which = seen.nonzero(as_tuple=True)
    banned = grams[rows, which, -1]
    keep = ~torch.isin(banned, exempt)
    return logits.index_put((rows[keep], banned[keep]), torch.tensor(float("-inf"), device=logits.device))


@torch.no_grad()
def generate(
    model: VisionLanguageModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    config: GenerationConfig | None = None,
    vision: torch.Tensor | None = None,
    context_ids: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
) -> list[list[int]]:
    """New token ids per prompt (stop token excluded). Prompts are left-padded: (B, T) ids and mask.

    Settings come from `config`; the keyword arguments override single fields of it. The placeholders'
    vectors come from `model.encode` as in the forward (`pixel_values`, or a text arm's `context_ids`
    and `context_mask`), or are given already computed (`vision`).
    """
    cfg = config or GenerationConfig()
    max_new_tokens = cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
    temperature = cfg.temperature if temperature is None else temperature
    top_p = cfg.top_p if top_p is None else top_p
    stop_ids = stop_ids if stop_ids is not None else cfg.stop_ids
    if stop_ids is None:
        stop_ids = getattr(model.tokenizer, "stop_ids", None) or [model.tokenizer.eos_id]
    device = input_ids.device
    stop = torch.tensor(list(stop_ids), device=device)
    exempt = torch.tensor(list(cfg.ngram_exempt_ids), dtype=torch.long, device=device)

    llm = model.llm
    batch_size, prompt_len = input_ids.shape
    if vision is None:
        vision = model.encode(pixel_values, context_ids, context_mask).vectors
    embeds = model.embed_inputs(input_ids, vision=vision)
    mask = torch.ones(batch_size, prompt_len + max_new_tokens, dtype=torch.long, device=device)
    mask[:, :prompt_len] = attention_mask
    cache = llm.new_kv_cache(batch_size, prompt_len + max_new_tokens) if use_cache else None
    positions = model.position_ids(input_ids, attention_mask.long())  # None: the LLM counts positions
    logits = llm(embeds, mask[:, :prompt_len], cache, positions, logits_to_keep=1)[:, -1]

    outputs = torch.empty(batch_size, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    steps = 0
    for step in range(max_new_tokens):
        if cfg.no_repeat_ngram_size > 0:
            logits = ban_repeated_ngrams(
                logits, outputs[:, :step], cfg.no_repeat_ngram_size, cfg.ngram_window, exempt
            )
        token = sample_next(logits, temperature, top_p, generator)
        token = token.masked_fill(finished, int(stop[0]))
        outputs[:, step] = token
        steps = step + 1
        finished |= torch.isin(token, stop)
        if finished.all() or steps == max_new_tokens:
            break
        token_embeds = llm.embed(token[:, None])
        new_position = model.next_position(positions, token[:, None])
        seen = mask[:, : prompt_len + steps]
        if use_cache:
            logits = llm(token_embeds, seen, cache, new_position, logits_to_keep=1)[:, -1]
            positions = new_position
        else:
            embeds = torch.cat([embeds, token_embeds], dim=1)
            positions = None if positions is None else torch.cat([positions, new_position], dim=1)
            logits = llm(embeds, seen, None, positions, logits_to_keep=1)[:, -1]

    stop_set = set(stop.tolist())
    results = []
    for row in outputs[:, :steps].tolist():
        ends = [i for i, t in enumerate(row) if t in stop_set]
        results.append(row[: ends[0]] if ends else row)
    return results
