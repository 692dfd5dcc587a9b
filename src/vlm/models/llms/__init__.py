"""Language-model backbones: each embeds ids, runs on `inputs_embeds` with a KV cache, owns its tokenizer."""

from vlm.models.llms.gpt import GPT, GPTConfig, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache"]
