"""Hugging Face causal LMs (SmolLM2, Qwen2.5, any `AutoModelForCausalLM`) behind the LLM interface.

`build_hf_llm` loads a checkpoint directory or Hub id strictly (every missing, unexpected or mis-shaped
tensor is an error naming it), adds `<image>` as a special token and grows the embedding for it, or
builds fresh weights from a small config with a byte tokenizer made in code (tests, `sizes=tiny`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.models.llms.lora import apply_lora
from vlm.models.llms.tokenizer import HFTokenizer, build_bytes_tokenizer
from vlm.models.pretrained import CheckpointMismatchError, checkpoint_dir, weight_dtype

log = logging.getLogger(__name__)

# files a causal LM and its tokenizer need from a Hub repo (weights, configs, vocab, merges, templates)
HUB_FILES = ["*.safetensors", "*.json", "*.txt", "*.jinja", "*.model", "*.tiktoken"]


# -- locating checkpoints -------------------------------------------------------------------------------
def resolve_source(source: str, what: str = "pretrained", option: str | None = None) -> Path:
    """A local directory as is; else the Hub repo of that id (model, config and tokenizer files),
    downloaded only when online or found in the Hub cache."""
    return checkpoint_dir(source, HUB_FILES, f"{option}: {what}" if option else what)


def load_tokenizer(name: str | None, pretrained_dir: Path | None, option: str | None = None):
    """`bytes` (made in code), a tokenizer directory or Hub id, or (None) the checkpoint's own."""
    from transformers import AutoTokenizer

    if name == "bytes":
        return build_bytes_tokenizer()
    if name is None:
        if pretrained_dir is None:
            raise ValueError(
                "fresh weights (pretrained=null) need a tokenizer: `bytes`, a directory or a Hub id"
            )
        return AutoTokenizer.from_pretrained(str(pretrained_dir))
    return AutoTokenizer.from_pretrained(str(resolve_source(name, "tokenizer", option)))


def check_loading_info(info: Mapping[str, Any], source: str, model: nn.Module) -> None:
    """Raise CheckpointMismatchError naming every missing, unexpected or mis-shaped tensor."""
    missing = sorted(info.get("missing_keys", ()))
    unexpected = sorted(info.get("unexpected_keys", ()))
    misshaped = sorted(
        f"{name} (checkpoint {tuple(checkpoint)}, model {tuple(own)})"
        for name, checkpoint, own in info.get("mismatched_keys", ())
    )
    problems = [
        f"{label}: {', '.join(names)}"
        for label, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
            ("errors", list(info.get("error_msgs", ()))),
        )
        if names
    ]
    if problems:
        raise CheckpointMismatchError(f"{type(model).__name__} cannot load {source}: " + "; ".join(problems))


# -- the model ------------------------------------------------------------------------------------------
class HFCausalLM(nn.Module):
    """A transformers causal LM driven by `inputs_embeds`, so vision tokens can be spliced in."""

    def __init__(self, model: nn.Module, tokenizer: HFTokenizer) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.hidden_size: int = model.config.hidden_size
        self.block_classes: tuple[type[nn.Module], ...] = decoder_layer_classes(model)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> embeddings (B, T, C)."""
        return self.model.get_input_embeddings()(input_ids)

    def new_kv_cache(self, batch_size: int, max_len: int):
        """A transformers DynamicCache (it grows as needed; `batch_size` and `max_len` are not needed)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each decoder layer's activations in the backward pass (in training mode)."""
        model = self.model
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            enable, disable = model.activation_checkpointing_enable, model.activation_checkpointing_disable
        else:
            enable, disable = model.gradient_checkpointing_enable, model.gradient_checkpointing_disable
        if enabled:
            enable({"use_reentrant": False})
        else:
            disable()
        self.activation_checkpointing = enabled

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache=None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Float32 logits (B, T, V) for embeddings (B, T, C); only the last `logits_to_keep` positions'
        when > 0.

        attention_mask (B, past + T) covers the cached and the new positions (1 = real token, padding on
        the left). Positions count real tokens, so left padding shifts none; `position_ids` (B, T)
        override them. The mask is always passed (all ones when None): without one, transformers reads
        jumps in the positions (vision tokens advancing by a stride) as packed sequences.
        """
        B, T, _ = inputs_embeds.shape
        device = inputs_embeds.device
        past = kv_cache.get_seq_length() if kv_cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=device)
            if position_ids is None:
                position_ids = torch.arange(past, past + T, device=device).expand(B, T)
        else:
            if attention_mask.shape != (B, past + T):
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)} must cover the {past} cached and {T} new "
                    f"positions of {B} sequences"
                )
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        out = self.model(
            inputs_embeds=inputs_embeds.to(self.dtype),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=kv_cache,
            use_cache=kv_cache is not None,
            logits_to_keep=logits_to_keep,
        )
        return out.logits.float()


def decoder_layer_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The model's decoder layer classes: those transformers keeps whole when splitting the model
    (`_no_split_modules`), else the class of the layers in the model's ModuleList of layers."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
        if lists:
            found = {type(m) for m in max(lists, key=len)}
    return tuple(sorted(found, key=lambda cls: cls.__name__))


def init_new_token_rows(model: nn.Module, new_rows: list[int], old_rows: int) -> None:
    """Set the embedding (and an untied output head's) rows `new_rows` to the mean of rows [0, old_rows)."""
    if not new_rows:
        return
    index = torch.tensor(new_rows)
    with torch.no_grad():
        weights = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings()
        if head is not None and head.weight is not weights[0]:
            weights.append(head.weight)
        for weight in weights:
            mean = weight[:old_rows].float().mean(0)
            weight[index.to(weight.device)] = mean.to(weight.dtype)


def build_hf_llm(
    pretrained: str | None = None,
    config: Mapping[str, Any] | None = None,
    tokenizer: str | None = None,
    dtype: str = "float32",
    activation_checkpointing: bool = False,
    chat_template: bool = True,
    attn_implementation: str = "sdpa",
    lora: Mapping[str, Any] | None = None,
    option: str | None = None,
) -> HFCausalLM:
    """Hydra entry point of `llm=smollm2_135m|smollm2_360m|qwen2_5_0_5b|qwen2_5_1_5b`.

    pretrained: a local directory (what `save_pretrained` writes) or a Hub id, loaded strictly; None
        builds fresh weights from `config` (`model_type` plus its fields, e.g. llama or qwen2).
    config: with `pretrained`, overrides of the checkpoint's config.
    tokenizer: `bytes` (256 byte tokens + ChatML specials, made in code), a directory or Hub id, or
        None for the checkpoint's own.
    dtype: `float32` or `bfloat16` weights (bf16 for frozen backbones); logits are float32 either way.
    chat_template: wrap prompts in the tokenizer's chat template (when it has one).
    lora: r > 0 puts LoRA adapters on the linear layers and freezes the rest (`vlm.models.llms.lora`).
    option: the config option (`llm=...`), for messages.
    """
    from omegaconf import DictConfig, OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = weight_dtype(dtype, f"{option}: llm.dtype" if option else "llm.dtype")
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    settings = dict(config or {})
    where = f"{option}: " if option else ""

    source_dir = resolve_source(pretrained, "pretrained", option) if pretrained is not None else None
    hf_tokenizer = load_tokenizer(tokenizer, source_dir, option)
    tokens_before = len(hf_tokenizer)
    tok = HFTokenizer(hf_tokenizer, chat_template=chat_template)
    added = [tok.image_token_id] if len(hf_tokenizer) > tokens_before else []

    if source_dir is None:
        if "model_type" not in settings:
            raise ValueError(
                f"{where}fresh weights (pretrained=null) need config.model_type (e.g. llama, qwen2)"
            )
        model_type = settings.pop("model_type")
        settings.setdefault("vocab_size", tok.vocab_size)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            settings.setdefault(name, getattr(tok, name.replace("_token", "")))
        model_config = AutoConfig.for_model(model_type, **settings)
        model = AutoModelForCausalLM.from_config(model_config, attn_implementation=attn_implementation)
        model = model.to(torch_dtype)
    else:
        model_type = settings.pop("model_type", None)
        model_config = AutoConfig.from_pretrained(str(source_dir), **settings)
        if model_type is not None and model_type != model_config.model_type:
            raise ValueError(
                f"{where}config.model_type={model_type!r} but {pretrained} is a {model_config.model_type!r} model"
            )
        model, info = AutoModelForCausalLM.from_pretrained(
            str(source_dir),
            config=model_config,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below, with the missing and unexpected keys
        )
        check_loading_info(info, str(pretrained), model)

    rows = model.get_input_embeddings().weight.shape[0]
    if tok.vocab_size > rows:
        model.resize_token_embeddings(tok.vocab_size, mean_resizing=False)
        added = sorted({*added, *range(rows, tok.vocab_size)})
    init_new_token_rows(model, added, min(tokens_before, rows))
    llm = HFCausalLM(model, tok)
    llm.set_activation_checkpointing(activation_checkpointing)
    log.info(
        "%s%s: %s, %s layers, width %d, %d tokens (%s)",
        where,
        pretrained or "fresh weights",
        type(model).__name__,
        model.config.num_hidden_layers,
        llm.hidden_size,
        tok.vocab_size,
        dtype,
    )
    return apply_lora(llm, lora)
