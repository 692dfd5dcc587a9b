"""English prose available offline on every machine: the documentation shipped with Python itself.

Two sources: `pydoc_data.topics` (the language reference's prose) and the docstrings of the standard
library's modules, classes and functions, together about 1 MB of English. Code listings and tables
are dropped; what remains is split into paragraphs, and each paragraph belongs to exactly one split.
The text depends on the Python version, so the synthetic data's recipe includes it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import random
import re
import sysconfig
from pathlib import Path

SPLITS = {"train": (0, 86), "val": (86, 93), "test": (93, 100)}  # percent buckets of a paragraph hash
_ASCII = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2026": "...",
        "\u2014": "--",
        "\u2013": "-",
    }
)
_PRINTABLE = re.compile(r"^[\x20-\x7e]+$")


_STDLIB_SKIP = (
    "test",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "config-",
)


def _stdlib_docstrings() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if any(part.startswith(_STDLIB_SKIP) for part in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
    return docs


@functools.lru_cache
def paragraphs() -> list[str]:
    """Prose paragraphs (whitespace collapsed, printable ASCII only), in a fixed order."""
    from pydoc_data.topics import topics

    documents = [topics[name] for name in sorted(topics)] + _stdlib_docstrings()
    found = []
    for document in documents:
        for block in re.split(r"\n\s*\n", document):
            if block.startswith((" ", "\t")):  # indented: code, grammar or table
                continue
            text = " ".join(block.translate(_ASCII).split())
            if len(text) >= 80 and _PRINTABLE.match(text) and _is_prose(text):
                found.append(text)
    return list(dict.fromkeys(found))


def _is_prose(text: str) -> bool:
    """Mostly letters and spaces, sentence punctuation, few code symbols."""
    letters = sum(c.isalpha() or c == " " for c in text)
    symbols = sum(c in "{}[]=<>*_\\|#@$%^&~`" for c in text)
    return letters / len(text) >= 0.8 and symbols / len(text) <= 0.03


def split_of(paragraph: str) -> str:
    bucket = int(hashlib.sha1(paragraph.encode()).hexdigest(), 16) % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def paragraphs_for(split: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return [p for p in paragraphs() if split_of(p) == split]


class NotEnoughText(RuntimeError):
    """The split's paragraphs hold too few snippets of the asked length."""


def snippets(split: str, count: int, min_chars: int, max_chars: int, seed: int) -> list[str]:
    """`count` word-aligned snippets of min_chars..max_chars characters from one split, deterministic."""
    if not 0 < min_chars <= max_chars:
        raise ValueError(f"need 0 < min_chars <= max_chars, got {min_chars}..{max_chars}")
    rng = random.Random(f"{split}-{seed}")
    source = [p.split(" ") for p in paragraphs_for(split)]
    result: list[str] = []
    attempts = 0
    while len(result) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise NotEnoughText(
                f"could not cut {count} snippets of {min_chars}-{max_chars} chars from the {split} split"
            )
        words = rng.choice(source)
        target = rng.randint(min_chars, max_chars)
        start = rng.randrange(len(words))
        text = words[start]
        for word in words[start + 1 :]:
            if len(text) + 1 + len(word) > target:
                break
            text += " " + word
        if min_chars <= len(text) <= max_chars:
            result.append(text)
    return result
