"""A tokenizer that needs no files: UTF-8 bytes plus a few special tokens."""

from __future__ import annotations

from vlm import IMAGE_TOKEN


class ByteTokenizer:
    """Token ids 0..255 are bytes; special tokens follow. `<image>` marks a vision-token placeholder."""

    special_tokens = ("<|bos|>", "<|eos|>", "<|pad|>", IMAGE_TOKEN)

    def __init__(self) -> None:
        self._special = {tok: 256 + i for i, tok in enumerate(self.special_tokens)}
        self.bos_id = self._special["<|bos|>"]
        self.eos_id = self._special["<|eos|>"]
        self.pad_id = self._special["<|pad|>"]
        self.image_token_id = self._special[IMAGE_TOKEN]

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special-token strings in `text` are encoded as their bytes."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Ids to text; special tokens are dropped, invalid UTF-8 is replaced."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def format_prompt(self, user_text: str) -> str:
        """The text the model sees before its answer (chat templates hook in here)."""
        return user_text
