"""One accounting of text: characters, UTF-8 bytes and tokens under named tokenizers.

A compression figure means nothing without its tokenizer, so every figure is named by one:
- `chars_per_vision_token`: characters of the text / vision tokens (no tokenizer);
- `compression_<name>`: tokens of the text under tokenizer `<name>` / vision tokens.

The tokenizers counted are the LLM's own (named `llm_<what it is>`, e.g. `llm_bytes`, `llm_bpe8192`)
and each reference in a config list (`reference_tokenizers`, default `[bytes, gpt2]`), given as:
- `bytes`: UTF-8 bytes;
- a known BPE vocabulary by name (`gpt2`, `cl100k`): its `.tiktoken` file in `REFERENCE_DIR`;
- a `.tiktoken` file (a path): recognised by its SHA-256 as one of `KNOWN_BPE` (which fixes its split
  pattern and name);
- anything else: a Hugging Face tokenizer directory or Hub id (read offline when HF_HUB_OFFLINE=1),
  named by its last path part.

`gpt2` is GPT-2's BPE (tiktoken's `r50k_base`, 50,257 tokens). It installs from the package registry
with nothing downloaded at run time: `make install` runs `python -m vlm.app.text_accounting install`, which
takes `whisper/assets/gpt2.tiktoken` out of the openai-whisper source distribution (`pip download
--no-deps`, no other package of it installed) into `REFERENCE_DIR`. Every load checks the file's SHA-256.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from vlm.files import atomic_write

REFERENCE_DIR = Path(sys.prefix) / "share" / "vlm" / "reference_tokenizers"
DEFAULT_REFERENCES = ("bytes", "gpt2")

# tiktoken's split patterns (tiktoken_ext/openai_public.py)
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|"""
    r"""\s*[\r\n]|\s+(?!\S)|\s"""
)


@dataclass(frozen=True)
class KnownBPE:
    """A public BPE vocabulary: its `.tiktoken` file, the file's SHA-256, its split pattern and where an
    offline copy comes from (None: none known; give the file's path)."""

    name: str
    file: str
    sha256: str
    pattern: str
    source: tuple[str, str] | None = None  # (pip requirement, member of its source distribution)


KNOWN_BPE = {
    "gpt2": KnownBPE(
        "gpt2",
        "gpt2.tiktoken",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
        R50K_PATTERN,
        ("openai-whisper==20250625", "openai_whisper-20250625/whisper/assets/gpt2.tiktoken"),
    ),
    "cl100k": KnownBPE(
        "cl100k",
        "cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        CL100K_PATTERN,
    ),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def name_part(text: str) -> str:
    """`text` as a metric-name part: lower case, runs of other characters as one `_`."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def llm_tokenizer_name(tokenizer) -> str:
    """`llm_` + what the LLM's tokenizer is: its `name` attribute, `bytes` for a byte-level one, a
    transformers tokenizer's name or a tiktoken encoding's name, else its class and vocabulary size
    (`llm_bpe8192` for `BPETokenizer`)."""
    name = getattr(tokenizer, "name", None)
    if not isinstance(name, str) or not name:
        probe = "aé€"
        hf_name = getattr(getattr(tokenizer, "hf", None), "name_or_path", None)
        encoding = getattr(tokenizer, "encoding", None)
        vocab_size = getattr(tokenizer, "vocab_size", None)
        if tokenizer.encode(probe) == list(probe.encode("utf-8")) and (vocab_size or 0) < 512:
            name = "bytes"
        elif hf_name:
            name = Path(str(hf_name)).name
        elif encoding is not None:
            name = encoding.name
        else:
            name = type(tokenizer).__name__.removesuffix("Tokenizer").lower() + str(vocab_size or "")
    return "llm_" + name_part(name)


def load_tiktoken_file(path: Path, expected_sha256: str | None = None) -> dict[bytes, int]:
    """The merge ranks in a `.tiktoken` file (base64 token, rank per line); ValueError naming the file
    when its SHA-256 is not `expected_sha256`."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise ValueError(
            f"{path}: SHA-256 {digest} is not the expected {expected_sha256}; the file is damaged or not "
            f"the one named (reinstall it: python -m vlm.app.text_accounting install)"
        )
    ranks = {}
    for line in data.decode("ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _known_by_hash(path: Path) -> KnownBPE:
    digest = sha256(path)
    for known in KNOWN_BPE.values():
        if known.sha256 == digest:
            return known
    names = ", ".join(f"{k.name} ({k.sha256})" for k in KNOWN_BPE.values())
    raise ValueError(
        f"{path}: not a known BPE file (SHA-256 {digest}), so its split pattern is unknown; known: {names}"
    )


def _tiktoken_counter(known: KnownBPE, path: Path) -> Callable[[str], int]:
    import tiktoken

    encoding = tiktoken.Encoding(
        known.name,
        pat_str=known.pattern,
        mergeable_ranks=load_tiktoken_file(path, known.sha256),
        special_tokens={},
    )
    return lambda text: len(encoding.encode_ordinary(text))


@lru_cache(maxsize=16)
def reference_counter(spec: str, directory: Path = REFERENCE_DIR) -> tuple[str, Callable[[str], int]]:
    """(name, text -> token count) for one reference tokenizer spec (see the module docstring)."""
    spec = str(spec)
    if spec == "bytes":
        return "bytes", lambda text: len(text.encode("utf-8"))
    if spec in KNOWN_BPE:
        known = KNOWN_BPE[spec]
        path = Path(directory) / known.file
        if not path.is_file():
            how = (
                "make install (or python -m vlm.app.text_accounting install)"
                if known.source
                else f"no package known to ship it: give the path of {known.file} instead of {spec}"
            )
            raise FileNotFoundError(f"reference tokenizer {spec}: {path} does not exist; {how}")
        return known.name, _tiktoken_counter(known, path)
    if spec.endswith(".tiktoken"):
        known = _known_by_hash(Path(spec))
        return known.name, _tiktoken_counter(known, Path(spec))
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(spec)
    return name_part(Path(spec.rstrip("/")).name), lambda text: len(hf.encode(text, add_special_tokens=False))


class TextAccounting:
    """Counts text under the LLM's tokenizer (optional; anything with `encode`) and reference tokenizers.

    `count(text)` -> {chars, bytes, tokens_<name>...}; `ratios(counts, vision_tokens)` ->
    {chars_per_vision_token, compression_<name>...}; `counts` may be sums or means over texts.
    """

    def __init__(self, llm_tokenizer=None, references: Iterable[str] = DEFAULT_REFERENCES) -> None:
        self.counters: dict[str, Callable[[str], int]] = {}
        if llm_tokenizer is not None:
            self.counters[llm_tokenizer_name(llm_tokenizer)] = lambda text: len(llm_tokenizer.encode(text))
        for spec in references or ():
            name, counter = reference_counter(str(spec))
            if name in self.counters:
                raise ValueError(f"two tokenizers named {name!r} in {list(references)}")
            self.counters[name] = counter

    @property
    def names(self) -> list[str]:
        return list(self.counters)

    @property
    def count_keys(self) -> list[str]:
        """The keys of `count`, in order."""
        return ["chars", "bytes", *(f"tokens_{name}" for name in self.counters)]

    def count(self, text: str) -> dict[str, int]:
        counts = [
            len(text),
            len(text.encode("utf-8")),
            *(counter(text) for counter in self.counters.values()),
        ]
        return dict(zip(self.count_keys, counts, strict=True))

    def mean_counts(self, texts: Sequence[str]) -> dict[str, float]:
        """Each count's mean over `texts`."""
        rows = [self.count(text) for text in texts]
        return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]} if rows else {}

    def ratios(self, counts: dict[str, float], vision_tokens: float) -> dict[str, float]:
        ratios = {"chars_per_vision_token": counts["chars"] / vision_tokens}
        return ratios | {
            f"compression_{name}": counts[f"tokens_{name}"] / vision_tokens for name in self.counters
        }


def compression_label(name: str) -> str:
    """An axis label for `compression_<name>`."""
    return f"compression ({name} tokens / vision tokens)"


def install(name: str = "gpt2", directory: Path = REFERENCE_DIR) -> Path:
    """Put known BPE file `name` into `directory` from its package's source distribution (pip download,
    no dependencies, nothing installed), checked by its SHA-256."""
    known = KNOWN_BPE[name]
    target = Path(directory) / known.file
    if target.is_file() and sha256(target) == known.sha256:
        return target
    if known.source is None:
        raise ValueError(f"no package known to ship {known.file}")
    requirement, member = known.source
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "--no-deps", "--no-binary", ":all:", "--dest", tmp, requirement], check=True)
        (archive,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            data = tar.extractfile(member).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != known.sha256:
        raise ValueError(f"{member} of {requirement}: SHA-256 {digest}, expected {known.sha256}")
    atomic_write(target, lambda file: file.write(data))
    return target
