"""A GPT in the architecture of nanochat (Karpathy, 2025).

Rotary embeddings, QK RMSNorm, ReLU² MLP, parameter-free RMSNorm, no biases, untied embedding and
head, logits soft-capped at 15, grouped KV heads. Parameter names follow nanochat's checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlm.models.llms.lora import apply_lora
from vlm.models.llms.tokenizer import BPETokenizer, ByteTokenizer, make_tokenizer


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 260
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 256
    logit_softcap: float = 15.0
    rotary_base: float = 10000.0
    spelled_head: bool = False  # SpelledHead instead of a plain output matrix (a model trained from scratch)
    learned_positions: int = 0  # > 0: a learned embedding of each position id below it, added to the input


class SpelledHead(nn.Module):
    """The output head of a from-scratch LLM whose tokens are strings of bytes: token v's row is a free
    vector plus its spelling, the sum over its first `SPELLED_BYTES` bytes of a byte embedding scaled per
    byte position, so a hidden state that says "the next bytes are ..." scores every token spelled so,
    rare ones included, before the free rows have learned them (a reader of images must output tokens
    it has seen rarely; docs/architecture.md, "Reading BPE tokens from images")."""

    def __init__(self, n_embd: int, token_bytes: list[bytes], vocab_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab_size, n_embd))
        self.byte_embed = nn.Embedding(257, n_embd)  # 256: no byte (past the token's end, a special token)
        self.byte_scale = nn.Parameter(torch.ones(SPELLED_BYTES, n_embd))
        spelling = torch.full((vocab_size, SPELLED_BYTES), 256, dtype=torch.long)
        for i, token in enumerate(token_bytes[:vocab_size]):
            spelling[i, : min(len(token), SPELLED_BYTES)] = torch.tensor(list(token[:SPELLED_BYTES]))
        self.register_buffer("spelling", spelling, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.normal_(self.byte_embed.weight, std=0.02)
        nn.init.ones_(self.byte_scale)

    def table(self) -> torch.Tensor:
        """(V, C): each token's row."""
        return self.weight + (self.byte_embed(self.spelling) * self.byte_scale).sum(1).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.table())


SPELLED_BYTES = 8  # bytes of a token its spelling counts (longer tokens: their first 8)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the head dimension. x: (B, T, H, D); cos/sin: (B, T, 1, D/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).to(x.dtype)


def segment_positions(segment_ids: torch.Tensor, steps: torch.Tensor | None = None) -> torch.Tensor:
    """Positions (B, T) that restart at 0 where each segment of a packed row starts: the sum of `steps`
    (how far each token advances the position; 1 each when None) over the earlier tokens of its segment."""
    steps = torch.ones_like(segment_ids) if steps is None else steps
    ends = steps.cumsum(-1)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    # each token's segment start: the running maximum of the start indices seen so far
    index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    first = torch.where(starts, index, 0).cummax(-1).values
    before = (ends - steps).gather(-1, first)  # the total of the steps before the segment
    return ends - steps - before


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean attention mask of packed rows: causal, and within a segment only (padding,
    segment 0, sees itself, so no row of the softmax is empty)."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    eye = torch.eye(T, dtype=torch.bool, device=segment_ids.device)
    return ((causal & same) | eye)[:, None]


class KVCache:
    """Preallocated keys/values for every layer, so each decoding step costs O(current length)."""

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, H, T, D) after the cached positions; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, H, D) -> (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)
        gqa = self.n_kv_head != self.n_head
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask, kv_cache):
        x = x + self.attn(rms_norm(x), cos, sin, attn_mask, kv_cache)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    """nanochat's GPT, driven by `inputs_embeds` so vision tokens can be spliced in."""

    block_classes = (Block,)
    supports_packing = True  # forward takes segment_ids (packed rows)

    def __init__(self, config: GPTConfig, tokenizer: ByteTokenizer | BPETokenizer | None = None) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer or ByteTokenizer()
        if self.tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but vocab_size is {config.vocab_size}"
            )
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            }
        )
        if config.learned_positions > 0:
            self.transformer["wpe"] = nn.Embedding(config.learned_positions, config.n_embd)
        self.lm_head = (
            SpelledHead(config.n_embd, self.tokenizer.token_bytes(), config.vocab_size)
            if config.spelled_head
            else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        )
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_rotary()
        self.reset_parameters()
        self.checkpointing = False

    @property
    def hidden_size(self) -> int:
        return self.config.n_embd

    @staticmethod
    def _rotary_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        # nanochat keeps the tables in bf16; matching its checkpoints needs the same rounding
        return freqs.cos().bfloat16(), freqs.sin().bfloat16()

    def reset_rotary(self) -> None:
        """(Re)compute the rotary tables, e.g. after building on the meta device and `to_empty`."""
        c = self.config
        self.cos, self.sin = self._rotary_tables(c.sequence_len * 10, c.n_embd // c.n_head, c.rotary_base)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward instead of keeping them (training only)."""
        self.checkpointing = enabled

    def grow_vocab(self, vocab_size: int) -> None:
        """Append rows to the embedding and the head up to `vocab_size`; existing rows stay bit-identical.

        New embedding rows are the mean of the existing ones, new head rows are zeros (as nanochat
        initialises its head), so a new token starts with logit 0 and changes no other logit.
        """
        old = self.config.vocab_size
        if self.config.spelled_head and vocab_size != old:
            raise ValueError("a spelled output head cannot grow its vocabulary")
        if vocab_size < old:
            raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size}")
        if vocab_size == old:
            return
        wte, head = self.transformer.wte.weight, self.lm_head.weight
        with torch.no_grad():
            mean = wte.float().mean(0, keepdim=True).to(wte.dtype).expand(vocab_size - old, -1)
            new_wte = torch.cat([wte, mean])
            new_head = torch.cat([head, head.new_zeros(vocab_size - old, head.shape[1])])
        self.transformer.wte.weight = nn.Parameter(new_wte, requires_grad=wte.requires_grad)
        self.transformer.wte.num_embeddings = vocab_size
        self.lm_head.weight = nn.Parameter(new_head, requires_grad=head.requires_grad)
        self.lm_head.out_features = vocab_size
        self.config = dataclasses.replace(self.config, vocab_size=vocab_size)

    def set_tokenizer(self, tokenizer) -> None:
        """Use `tokenizer`, growing the vocabulary (`grow_vocab`) when its ids go beyond it."""
        if tokenizer.vocab_size > self.config.vocab_size:
            self.grow_vocab(tokenizer.vocab_size)
        self.tokenizer = tokenizer

    def reset_parameters(self) -> None:
        """nanochat's init: fan-in scaled normals, zero output projections and head."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if name.endswith("c_proj") or name == "lm_head":
                    nn.init.zeros_(module.weight)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        if isinstance(self.lm_head, SpelledHead):
            self.lm_head.reset_parameters()
        if "wpe" in self.transformer:  # zeros: the rotary model it starts as
            nn.init.zeros_(self.transformer.wpe.weight)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> embeddings (B, T, C)."""
        return self.transformer.wte(input_ids)

    def position_embeddings(self, positions: torch.Tensor) -> torch.Tensor:
        """The learned embeddings of `positions` (`learned_positions`); a position beyond the table is an
        error naming it (text counted in bytes runs further than in tokens)."""
        table = self.transformer.wpe
        last = int(positions.max())
        if last >= table.num_embeddings:
            raise ValueError(
                f"position {last} is beyond the {table.num_embeddings} learned positions "
                f"(llm.learned_positions): raise it, or shorten the samples"
            )
        return table(positions)

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        c = self.config
        ref = self.lm_head.weight
        return KVCache(
            c.n_layer, batch_size, c.n_kv_head, c.n_embd // c.n_head, max_len, ref.device, ref.dtype
        )

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for embeddings (B, T, C); only the last `logits_to_keep` positions' when > 0
        (decoding needs the last one, and a prompt's full logits over a large vocabulary cost memory).

        attention_mask (B, S) covers the cached and the new positions (1 = real token); it is needed
        only with padding on the left. Positions count real tokens, so left padding does not shift them;
        `position_ids` (B, T) of the new tokens overrides them. `segment_ids` (B, T) packs several
        sequences in a row (training, no cache): a token attends only to earlier tokens of its own
        segment, and positions restart at each (`segment_positions`).
        """
        B, T, _ = inputs_embeds.shape
        past = kv_cache.length if kv_cache is not None else 0
        if segment_ids is not None:
            if kv_cache is not None:
                raise ValueError("packed sequences (segment_ids) are for training: no KV cache")
            positions = segment_positions(segment_ids)
            attn_mask = segment_mask(segment_ids)
        elif attention_mask is None:
            positions = torch.arange(past, past + T, device=inputs_embeds.device).expand(B, T)
            # a chunk after the cache sees the cache and itself causally (query i at past + i)
            attn_mask = (
                None
                if past == 0
                else torch.ones(T, past + T, dtype=torch.bool, device=inputs_embeds.device).tril(past)[
                    None, None
                ]
            )
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + T]
            causal = torch.ones(T, past + T, dtype=torch.bool, device=inputs_embeds.device).tril(past)
            attn_mask = causal[None, None] & attention_mask[:, None, None, : past + T].bool()
            # a fully padded query row would give NaNs: let it see itself
            idx = torch.arange(T, device=inputs_embeds.device)
            attn_mask[:, :, idx, past + idx] = True
        if position_ids is not None:
            positions = position_ids
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]
        x = rms_norm(inputs_embeds.to(self.transformer.wte.weight.dtype))  # a bf16 backbone, fp32 inputs
        if "wpe" in self.transformer:
            x = x + self.position_embeddings(positions)
        recompute = self.checkpointing and self.training and kv_cache is None and torch.is_grad_enabled()
        for block in self.transformer.h:
            if recompute:
                x = checkpoint(block, x, cos, sin, attn_mask, None, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(rms_norm(x)).float()
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap)


_checkpoint_tokenizer: ContextVar[BPETokenizer | None] = ContextVar("checkpoint_tokenizer", default=None)

# llm.lora's default (conf/llm/shared/lora.yaml): r = 0, no adapters
NO_LORA = MappingProxyType({"r": 0, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"})


@contextlib.contextmanager
def tokenizer_from_checkpoint(tokenizer: BPETokenizer | None) -> Iterator[None]:
    """Within it, `build_gpt` uses `tokenizer` (the one a checkpoint holds) instead of making the one its
    arguments name, so a trained model is rebuilt without the tokenizer cache; None changes nothing. (Not
    a config value: the run config is saved and logged, and would carry the tokenizer's whole JSON.)"""
    reset = _checkpoint_tokenizer.set(tokenizer)
    try:
        yield
    finally:
        _checkpoint_tokenizer.reset(reset)


def build_gpt(
    tokenizer: str = "bpe",
    tokenizer_vocab_size: int = 1024,
    tokenizer_dir: str = "data/tokenizers",
    vocab_size: int | None = None,
    sequence_len: int = 1024,
    n_layer: int = 4,
    n_head: int = 4,
    n_kv_head: int | None = None,
    n_embd: int = 256,
    position_unit: str = "byte",
    spelled_head: bool = True,
    learned_positions: int = 0,
    lora: Mapping | None = NO_LORA,
) -> GPT:
    """A freshly initialised GPT (Hydra entry point of `llm=tiny`) with the tokenizer `tokenizer` names:
    `bytes`, or `bpe` trained on the built-in corpus with `tokenizer_vocab_size` ids and cached in
    `tokenizer_dir` (vlm.models.llms.tokenizer.make_tokenizer). `vocab_size`: the embedding's rows, None
    for the tokenizer's. `position_unit`: what advances its position by one for text, a `token` or (a
    model trained from scratch may choose) a `byte` of it (VisionLanguageModel's `text_position_unit`).
    `spelled_head`: `SpelledHead` as the output head. `learned_positions` > 0: a learned embedding of
    each position id below it added to the input, as GPT-2's (rotary alone gives a token no feature of
    where it stands; a reader of dense vision tokens needs its offset within one).
    `lora` (r > 0): LoRA adapters on the linear layers, the rest frozen. The defaults are llm=tiny's
    (conf/llm/tiny.yaml); `bpe` trains its tokenizer on first use (cached in `tokenizer_dir`), `bytes` needs
    none."""
    tok = _checkpoint_tokenizer.get() or make_tokenizer(tokenizer, tokenizer_vocab_size, tokenizer_dir)
    config = GPTConfig(
        sequence_len=sequence_len,
        vocab_size=vocab_size or tok.vocab_size,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_kv_head or n_head,
        n_embd=n_embd,
        spelled_head=spelled_head,
        learned_positions=learned_positions,
    )
    gpt = GPT(config, tok)
    gpt.position_unit = position_unit
    return apply_lora(gpt, lora)
