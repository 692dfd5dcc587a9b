"""Every tokenizer of the project, in one module: UTF-8 bytes plus a few special tokens (no files), a
byte-level BPE trained on the built-in corpus (HF `tokenizers`, one JSON file), nanochat's BPE (tiktoken),
and a transformers tokenizer behind the same interface (`HFTokenizer`; `build_bytes_tokenizer`, the bytes
one in transformers' form, made in code). Loading them from checkpoints and the Hub is the backbones'
(`hf.load_tokenizer`, `nanochat.load_tokenizer`).

Every tokenizer offers `encode`, `decode`, `bos_id`, `eos_id`, `pad_id`, `image_token_id`, `stop_ids`,
`vocab_size` and `format_prompt`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from vlm import IMAGE_TOKEN
from vlm.files import atomic_write

log = logging.getLogger(__name__)


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

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end a generated answer."""
        return [self.eos_id]

    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for (a special token: none)."""
        return [bytes([i]) for i in range(256)] + [b""] * len(self.special_tokens)

    def format_prompt(self, user_text: str) -> str:
        """The text the model sees before its answer (chat templates hook in here)."""
        return user_text


# GPT-4's pre-tokenizer pattern as nanochat uses it (digits in groups of at most two): BPE merges stay
# within a word, a number group, a run of punctuation or of whitespace
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]"""
    r"""|\s+(?!\S)|\s+"""
)


class BPETokenizer:
    """Byte-level BPE (an HF `tokenizers` Tokenizer, saved as one JSON string) with ByteTokenizer's special
    tokens as its last ids, as nanochat appends its own.

    Any text encodes: it is split with `SPLIT_PATTERN` and merged from its UTF-8 bytes. As with the byte
    tokenizer, special-token strings in `encode`'s text (`<image>`) are encoded as text, never as their
    ids, and `decode` drops special tokens; invalid UTF-8 is replaced.
    """

    special_tokens = ByteTokenizer.special_tokens

    def __init__(self, tokenizer) -> None:
        ids = {tok: tokenizer.token_to_id(tok) for tok in self.special_tokens}
        missing = [tok for tok, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the BPE tokenizer lacks the special tokens {', '.join(missing)}")
        self.hf = tokenizer
        self.hf.encode_special_tokens = True  # not saved in the JSON: text never yields a special id
        self.bos_id, self.eos_id = ids["<|bos|>"], ids["<|eos|>"]
        self.pad_id, self.image_token_id = ids["<|pad|>"], ids[IMAGE_TOKEN]

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        """The tokenizer of an HF `tokenizers` JSON string (`to_json`'s output)."""
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    @classmethod
    def from_file(cls, file: str | Path) -> BPETokenizer:
        return cls.from_json(Path(file).read_text(encoding="utf-8"))

    def to_json(self) -> str:
        return self.hf.to_str()

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> list[int]:
        return [self.eos_id]

    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for (a special token: none), from its byte-level string (one
        character per byte, GPT-2's `bytes_to_unicode` alphabet)."""
        special = {self.hf.token_to_id(tok) for tok in self.special_tokens}
        to_byte = {char: byte for byte, char in byte_level_alphabet().items()}
        return [
            b"" if i in special else bytes(to_byte[c] for c in self.hf.id_to_token(i))
            for i in range(self.vocab_size)
        ]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        kept = [i for i in ids if 0 <= i < self.vocab_size]
        return self.hf.decode(kept, skip_special_tokens=True)

    def format_prompt(self, user_text: str) -> str:
        return user_text


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's `bytes_to_unicode`, the alphabet of byte-level BPE: each byte as one printable character
    (printable Latin-1 bytes as themselves, the others as U+0100 onwards, in byte order)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """A byte-level BPE tokenizer trained on `texts`, with at most `vocab_size` ids, the special tokens
    (appended last) included. The same texts and size give the same tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    special = BPETokenizer.special_tokens
    if vocab_size < 256 + len(special):
        raise ValueError(
            f"a byte-level BPE vocabulary needs at least {256 + len(special)} ids, got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in special])
    return BPETokenizer(tokenizer)


def corpus_bpe_tokenizer(vocab_size: int, cache_dir: str | Path) -> BPETokenizer:
    """`train_bpe` on the built-in corpus's train split (vlm.corpus), trained once and cached as
    `<cache_dir>/bpe-<vocab_size>-<hash of the corpus and the settings>.json`; later calls read the file."""
    from vlm.corpus import paragraphs_for

    texts = paragraphs_for("train")
    settings = {"split_pattern": SPLIT_PATTERN, "special_tokens": BPETokenizer.special_tokens}
    digest = hashlib.sha256(json.dumps(settings).encode())
    for text in texts:
        digest.update(text.encode() + b"\0")
    file = Path(cache_dir) / f"bpe-{vocab_size}-{digest.hexdigest()[:12]}.json"
    if file.is_file():
        log.info("BPE tokenizer: %s", file)
        return BPETokenizer.from_file(file)
    start = time.perf_counter()
    tokenizer = train_bpe(texts, vocab_size)
    log.info(
        "trained a BPE tokenizer of %d ids on the corpus's train split (%d paragraphs) in %.2f s: %s",
        tokenizer.vocab_size,
        len(texts),
        time.perf_counter() - start,
        file,
    )
    atomic_write(
        file, lambda f: f.write(tokenizer.to_json().encode("utf-8"))
    )  # two runs at once: no collision
    return tokenizer


def make_tokenizer(name: str, vocab_size: int, cache_dir: str | Path) -> ByteTokenizer | BPETokenizer:
    """The tokenizer `llm.tokenizer` names: `bytes` (ByteTokenizer) or `bpe` (`corpus_bpe_tokenizer` of
    `vocab_size` ids, cached in `cache_dir`)."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "bpe":
        return corpus_bpe_tokenizer(vocab_size, cache_dir)
    raise ValueError(f"llm.tokenizer={name!r} is not a tokenizer; expected bytes or bpe")


# nanochat's special tokens, in its order; they sit at the end of its vocabulary
NANOCHAT_SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)
# what this framework uses: document start, the chat turn around a prompt and the end of an answer
NANOCHAT_REQUIRED_TOKENS = NANOCHAT_SPECIAL_TOKENS[:5]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asks for a class or function that a tiktoken Encoding does not need; nothing was run."""


class _EncodingState:
    """Stands in for `tiktoken.core.Encoding` while unpickling: keeps the pickled state, runs nothing.

    (Encoding's own `__setstate__` would accept a bare name and fetch that registered encoding.)
    """

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """How pickle protocols 0-2 store bytes (`_codecs.encode(text, "latin1")`), and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(
            f"_codecs.encode is only allowed as pickle uses it for bytes, not {encoding!r}"
        )
    return text.encode("latin1")


def _reconstruct(cls: type, base: type, state: Any) -> Any:
    """`copyreg._reconstructor` (pickle protocols 0-1), for the stand-in class only."""
    if cls is not _EncodingState or base is not object:
        raise UnsafePickleError(
            f"copyreg._reconstructor is only allowed for tiktoken.core.Encoding, not {cls}"
        )
    return _EncodingState()


class _TiktokenUnpickler(pickle.Unpickler):
    """Resolves only the globals that a pickled `tiktoken.Encoding` refers to; refuses every other."""

    ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("tiktoken.core", "Encoding"): _EncodingState,
        ("_codecs", "encode"): _latin1,
        ("copyreg", "_reconstructor"): _reconstruct,
        ("builtins", "object"): object,
    }
    # protocols 0-2 write Python 2's module names
    ALLOWED.update({("copy_reg", "_reconstructor"): _reconstruct, ("__builtin__", "object"): object})

    def __init__(self, file, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in self.ALLOWED)
            raise UnsafePickleError(
                f"{self.source} refers to {module}.{name}, which a tiktoken Encoding does not need; "
                f"refusing to load it (allowed: {allowed})"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source} holds a persistent id, which a tiktoken Encoding does not")


def load_tiktoken_pickle(file: str | Path):
    """The `tiktoken.Encoding` pickled in `file` (nanochat's `tokenizer.pkl`), unpickled so that no code
    from the file runs: only Encoding's state (name, split pattern, ranks, special tokens) is read, and
    the Encoding is built from it here. Anything else in the pickle raises `UnsafePickleError`."""
    import tiktoken

    with open(file, "rb") as f:
        loaded = _TiktokenUnpickler(f, str(file)).load()
    state = getattr(loaded, "state", None) if isinstance(loaded, _EncodingState) else None
    keys = {"name", "pat_str", "mergeable_ranks", "special_tokens"}
    if not isinstance(state, dict) or set(state) != keys:
        got = (
            sorted(state)
            if isinstance(state, dict)
            else type(state if state is not None else loaded).__name__
        )
        raise ValueError(f"{file} is not a pickled tiktoken Encoding with {sorted(keys)} (got {got})")
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    if not (
        isinstance(state["name"], str)
        and isinstance(state["pat_str"], str)
        and isinstance(ranks, dict)
        and all(isinstance(k, bytes) and type(v) is int for k, v in ranks.items())
        and isinstance(specials, dict)
        and all(isinstance(k, str) and type(v) is int for k, v in specials.items())
    ):
        raise ValueError(f"{file}: the Encoding's state has unexpected types")
    return tiktoken.Encoding(
        state["name"], pat_str=state["pat_str"], mergeable_ranks=ranks, special_tokens=specials
    )


class NanochatTokenizer:
    """nanochat's BPE tokenizer (a tiktoken Encoding) with `<image>` appended as the last id.

    - `encode(text)`: ordinary text, except that nanochat's special-token strings become their ids (the
      data code encodes the pieces of `format_prompt`'s output); `<image>` is never produced by it.
    - `decode(ids)`: special tokens, `<image>` and ids outside the vocabulary are dropped.
    - bos `<|bos|>` (also the pad id: padding is always masked), eos `<|assistant_end|>`, and
      `stop_ids` = [`<|assistant_end|>`, `<|bos|>`]; `format_prompt` is nanochat's chat turn
      `<|user_start|>text<|user_end|><|assistant_start|>` (the processor puts bos in front).
    """

    def __init__(self, encoding, source: str = "") -> None:
        self.encoding = encoding
        self.source = source or encoding.name
        names = encoding.special_tokens_set
        missing = [tok for tok in NANOCHAT_REQUIRED_TOKENS if tok not in names]
        if missing:
            raise ValueError(f"tokenizer {self.source} lacks nanochat's special tokens {', '.join(missing)}")
        self.special_ids = {tok: encoding.encode_single_token(tok) for tok in names}
        self._allowed = frozenset(tok for tok in NANOCHAT_SPECIAL_TOKENS if tok in names)
        self.bos_id = self.special_ids["<|bos|>"]
        self.eos_id = self.special_ids["<|assistant_end|>"]
        self.pad_id = self.bos_id
        self.image_token_id = encoding.n_vocab  # appended: the model grows a row for it
        self._skip = {*self.special_ids.values(), self.image_token_id}

    @classmethod
    def from_directory(cls, directory: str | Path) -> NanochatTokenizer:
        """Read `tokenizer.pkl` of a nanochat tokenizer directory (`token_bytes.pt` next to it is only
        used by nanochat's bits-per-byte evaluation and is not read)."""
        file = Path(directory) / "tokenizer.pkl"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.pkl in {directory} (a nanochat tokenizer directory)")
        return cls(load_tiktoken_pickle(file), str(file))

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab + 1

    @property
    def stop_ids(self) -> list[int]:
        return [self.eos_id, self.bos_id]

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special=self._allowed, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        n_vocab = self.encoding.n_vocab
        kept = [i for i in ids if 0 <= i < n_vocab and i not in self._skip]
        return self.encoding.decode(kept, errors="replace")

    def format_prompt(self, user_text: str) -> str:
        return f"<|user_start|>{user_text}<|user_end|><|assistant_start|>"


# -- transformers tokenizers ------------------------------------------------------------------------
# end-of-turn tokens of common chat templates: a stop token when the template uses it
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|assistant_end|>")

# A small ChatML template (as SmolLM2 and Qwen2.5 use, without their default system prompts).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BYTES_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def byte_symbols() -> list[str]:
    """The printable character that byte-level BPE uses for each byte value 0..255: printable Latin-1
    characters stand for themselves, the others are shifted past 255 in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def build_bytes_tokenizer():
    """A tokenizer made in code: ids 0..255 are the UTF-8 bytes (byte-level BPE without merges), then
    `<|endoftext|>` (eos and pad), `<|im_start|>`, `<|im_end|>`; a ChatML chat template; no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: byte for byte, symbol in enumerate(byte_symbols())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(BYTES_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


class HFTokenizer:
    """A transformers tokenizer with the interface the data pipeline and generation use.

    `<image>` is a special token of its own; `encode` never yields it (callers split prompts on the
    marker first), and `decode` drops special tokens. `bos_id` is None when the tokenizer has no BOS
    (Qwen2.5). `stop_ids` are eos plus the chat template's end-of-turn token when it has one.
    """

    def __init__(self, tokenizer, chat_template: bool = True) -> None:
        from tokenizers import AddedToken

        self.hf = tokenizer
        self.use_chat_template = chat_template
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens(
                [AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True
            )
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer {type(tokenizer).__name__} has no eos token")
        self.eos_id: int = tokenizer.eos_token_id
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.bos_id: int | None = tokenizer.bos_token_id
        template = self.chat_template or ""
        vocab = tokenizer.get_vocab()
        end_of_turn = [vocab[token] for token in END_OF_TURN if token in template and token in vocab]
        self.stop_ids: list[int] = [self.eos_id] + [i for i in end_of_turn if i != self.eos_id]
        self._image_text = [*self._encode("<"), *self._encode(IMAGE_TOKEN[1:])]

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.hf, "chat_template", None) if self.use_chat_template else None
        if isinstance(template, Mapping):  # several named templates: the default one
            template = template.get("default")
        return template or None

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens (`<image>`) included."""
        return len(self.hf)

    def _encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False) if text else []

    def encode(self, text: str) -> list[int]:
        """Text to ids, no BOS/EOS added. Special-token strings of the chat template (`<|im_start|>`)
        become their ids; a literal `<image>` is encoded as ordinary text, never as the placeholder."""
        ids: list[int] = []
        for i, piece in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids += self._image_text
            ids += self._encode(piece)
        return ids

    def decode(self, ids: list[int]) -> str:
        """Ids to text, special tokens dropped."""
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def format_prompt(self, user_text: str) -> str:
        """`user_text` as the user's turn of the chat template, with the assistant's turn opened; the
        text unchanged when the tokenizer has no template (or `chat_template=False`)."""
        if self.chat_template is None:
            return user_text
        messages = [{"role": "user", "content": user_text}]
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
