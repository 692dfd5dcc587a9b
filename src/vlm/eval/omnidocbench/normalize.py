"""String normalisation applied before any OmniDocBench comparison.

Everything here follows the official v1.5 code (``utils/data_preprocess.py``) rule by rule; the order of the
replacements matters and is kept:

* text (``normalize_text``): inline math (``$..$`` or ``\\(..\\)``) that contains ``\\``, ``^`` or ``_`` is
  rendered to unicode with pylatexenc (after deleting escaped ``\\\\ \\_ \\& \\% \\^`` together with the
  character they escape), then the literal strings ``\\t``, ``\\n``, ``/t``, ``/n`` and tabs/newlines are
  removed and only ``[\\w\\u4e00-\\u9fff]`` is kept: no whitespace, no punctuation, no ``$``.
* formulas (``normalize_formula``): outer ``$`` and ``\\[..\\]`` delimiters, ``\\tag{}``, ``\\hspace{}``,
  ``\\begin{..}``/``\\end{..}``, ``\\arraycolsep..}``, leading/trailing dots, a fixed list of font/spacing
  macros and all spaces are removed, then lowercased.
* tables (``normalize_html_table``): ``th``->``td``, ``thead``/``span`` unwrapped, MathML ``<math>``
  replaced by ``$alttext$`` (BeautifulSoup, ``html.parser``), entities unescaped, NFKC, ``style``, ``height``,
  ``width``, ``align``, ``class`` attributes and ``tbody`` removed, whitespace collapsed, wrapped as
  ``<html><body><table border="1" >...</table></body></html>``, then ``sup/sub/span/div/p`` tags and
  ``<colgroup>`` dropped.

pylatexenc must be the version the official code pins (3.0a30): ``latex_to_text`` output differs between
pylatexenc 2.x and 3.x for some macros.
"""

from __future__ import annotations

import html
import re
import unicodedata
from functools import lru_cache
from typing import Any

__all__ = [
    "clean_text",
    "inline_math_to_unicode",
    "latex_to_unicode",
    "normalize_formula",
    "normalize_html_table",
    "normalize_text",
]

# ---------------------------------------------------------------------------------------------- text

_INLINE_MATH = re.compile(r"\$(.*?)\$|\\\((.*?)\\\)")
_ESCAPED_CHAR = re.compile(r"\\([\\_&%^])")
_NOT_WORD = re.compile(r"[^\w\u4e00-\u9fff]")


@lru_cache(maxsize=1)
def _latex_converter() -> Any:
    from pylatexenc.latex2text import LatexNodes2Text

    return LatexNodes2Text()


def latex_to_unicode(latex: str) -> str:
    """pylatexenc's ``LatexNodes2Text().latex_to_text`` (one shared converter; it keeps no state)."""
    return _latex_converter().latex_to_text(latex)


def inline_math_to_unicode(text: str) -> str:
    """Replace inline math that has a ``\\``, ``^`` or ``_`` by its unicode rendering (official
    ``textblock2unicode``); other inline math is left as it is, delimiters included."""
    replacements: list[tuple[int, int, str]] = []
    for match in _INLINE_MATH.finditer(text):
        body = match.group(1) if match.group(1) is not None else match.group(2)
        body = _ESCAPED_CHAR.sub("", body)
        if not any(char in body for char in "\\^_"):
            continue
        if body.endswith("\\"):
            body += " "
        try:
            rendered = latex_to_unicode(body)
        except Exception:  # the official code skips formulas pylatexenc cannot parse
            continue
        replacements.append((match.start(), match.end(), rendered))
    for start, end, rendered in sorted(replacements, reverse=True):
        text = text[:start] + rendered.strip() + text[end:]
    return text


def clean_text(text: str) -> str:
    """Keep only word characters and CJK ideographs (official ``clean_string``)."""
    for junk in ("\\t", "\\n", "\t", "\n", "/t", "/n"):
        text = text.replace(junk, "")
    return _NOT_WORD.sub("", text)


def normalize_text(text: str) -> str:
    """The text-block normalisation used for matching and for the text edit distance."""
    return clean_text(inline_math_to_unicode(text))


# ------------------------------------------------------------------------------------------- formula

# Removed with str.replace in this order (so e.g. "\mathbfcal" loses "\mathbf" first and keeps "cal").
_FORMULA_TOKENS = (
    "\\mathbf", "\\mathrm", "\\mathnormal", "\\mathit", "\\mathbb", "\\mathcal", "\\mathscr", "\\mathfrak",
    "\\mathsf", "\\mathtt", "\\textbf", "\\text", "\\boldmath", "\\boldsymbol", "\\operatorname", "\\bm",
    "\\symbfit", "\\mathbfcal", "\\symbf", "\\scriptscriptstyle", "\\notag", "\\setlength", "\\coloneqq",
    "\\space", "\\thickspace", "\\thinspace", "\\medspace", "\\nobreakspace", "\\negmedspace", "\\quad",
    "\\qquad", "\\enspace", "\\substackw", " ", "$$", "\\left", "\\right", "\\displaystyle", "\\text",
)  # fmt: skip
_DISPLAY_DELIMITED = re.compile(r"\\\[(.+?)(?<!\\)\\\]")
_FORMULA_PATTERNS = tuple(
    re.compile(p)
    for p in (r"\\tag\{.*?\}", r"\\hspace\{.*?\}", r"\\begin\{.*?\}", r"\\end\{.*?\}", r"\\arraycolsep.*?\}")
)


def normalize_formula(text: str) -> str:
    """Formula normalisation for matching and the formula edit distance (official ``normalized_formula``)."""
    text = text.strip().strip("$").strip("\n")
    delimited = _DISPLAY_DELIMITED.search(text)
    if delimited:
        text = delimited.group(1).strip()
    for pattern in _FORMULA_PATTERNS:
        text = pattern.sub("", text)
    text = text.strip(".")
    for token in _FORMULA_TOKENS:
        text = text.replace(token, "")
    return text.lower()


# --------------------------------------------------------------------------------------------- table

_TABLE_INNER = re.compile(r"<table\b[^>]*>(.*)</table>", re.DOTALL | re.IGNORECASE)
_DROPPED_ATTRIBUTES = tuple(
    re.compile(f'( {name}=".*?")') for name in ("style", "height", "width", "align", "class")
)
_TBODY = re.compile("</?tbody>")
_WHITESPACE = re.compile(r"\s+")
_COLGROUP = re.compile("<colgroup>.*?</colgroup>")
_DROPPED_TAGS = (
    "<sup>", "</sup>", "<sub>", "</sub>", "<span>", "</span>", "<div>", "</div>", "<p>", "</p>",
    '<spandata-span-identity="">',
)  # fmt: skip
TABLE_PREFIX = '<html><body><table border="1" >'
TABLE_SUFFIX = "</table></body></html>"


def _simplify_table_markup(markup: str) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(markup, "html.parser")
    for th in soup.find_all("th"):
        th.name = "td"
    for thead in soup.find_all("thead"):
        thead.unwrap()
    for math in soup.find_all("math"):
        math.replace_with(f"${math.get('alttext', '')}$")
    for span in soup.find_all("span"):
        span.unwrap()
    return str(soup)


def normalize_html_table(markup: str) -> str:
    """Canonical HTML of a table for TEDS and the table edit distance; ``""`` when it holds no ``<table``."""
    if "<table" not in markup.replace(" ", "").replace("'", '"'):
        return ""
    text = html.unescape(_simplify_table_markup(markup)).replace("\n", "")
    text = unicodedata.normalize("NFKC", text).strip()
    text = "".join(_TABLE_INNER.findall(text))
    for pattern in _DROPPED_ATTRIBUTES:
        text = pattern.sub("", text)
    text = _TBODY.sub("", text)
    text = _WHITESPACE.sub(" ", text)
    text = TABLE_PREFIX + text + TABLE_SUFFIX
    for tag in _DROPPED_TAGS:
        text = text.replace(tag, "")
    return _COLGROUP.sub("", text)
