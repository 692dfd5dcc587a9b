"""Split one page of predicted markdown into blocks, as the official OmniDocBench v1.5 scorer does.

This is a re-implementation of ``md_tex_filter`` (``utils/extract.py``, with ``utils/data_preprocess.py``
and the markdown-table helpers). The steps, in the official order:

1. remove images ``![..](..)``; remove ````` ```markdown ````` / ````` ```html ````` / ````` ```latex `````
   at line starts and ````` ``` ````` at line ends (so a closing fence is usually gone before step 7 looks
   for code blocks); squeeze runs of 5+ underscores or spaces to 4; drop ``<html>``/``<body>`` tags.
2. LaTeX tables: ``\\begin{table}..\\end{table}`` (non-nested), then outermost ``\\begin{tabular}`` blocks
   (nesting-aware scan).
3. HTML tables: outermost ``<table ...>..</table>`` blocks (nesting-aware scan).
4. Math: ``$$..$$`` and ``\\[..\\]`` become display formulas (``$$..$$`` rewritten as ``\\[..\\]``) and are
   cut out of the text; ``$..$`` and ``\\(..\\)`` are *also* recorded as formulas (``equation_inline``) but
   stay in the text, where the text normalisation turns them into unicode.
5. Markdown pipe tables (only when at least two ``|...|`` rows exist) are converted to HTML tables.
6. Fenced code blocks with a language tag become text blocks.
7. ``\\title{}``, ``\\text{}``, ``\\section{}`` wrappers are removed; the rest is split on blank lines (on
   single newlines if there is no blank line) into paragraphs; a paragraph that is a whole ``<table>`` is a
   table, one that starts and ends with ``$`` is a formula, anything else is text.

Every extracted span is replaced by spaces so later steps do not see it again. Block positions are
character offsets used for sorting and reading order; the official code's offsets are not exact (the
markdown-table conversion and step 7 change the text length, and paragraph offsets do not count the blank
lines between them) and these quirks are reproduced on purpose, since they decide reading-order ties.
Scanning quirks of the official nesting-aware table scans (how far they skip after a match, the extra
character kept after ``\\end{tabular}``) are reproduced too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

__all__ = ["PredBlock", "markdown_table_to_html", "parse_markdown"]

# block kinds (the official ``category_type`` of a prediction)
TEXT = "text_all"
FORMULA = "equation_isolated"
HTML_TABLE = "html_table"
LATEX_TABLE = "latex_table"
INLINE = "equation_inline"  # fine kind of inline math
MD_TABLE = "md2html_table"  # fine kind of a converted markdown table


@dataclass(frozen=True)
class PredBlock:
    """One predicted element: ``kind`` is the coarse category, ``fine`` the official fine category."""

    kind: str
    start: int
    content: str
    fine: str | None = None

    @property
    def category(self) -> str:
        """The category the official code reports for the prediction (fine one when present)."""
        return self.fine or self.kind

    def with_content(self, content: str, kind: str | None = None) -> PredBlock:
        return replace(self, content=content, kind=kind or self.kind)


# matches visited by the nesting-aware table scans of one page, over all restarts: a real page needs
# hundreds, 8000 unclosed "<table>" (56 KB) ~10^7, 40 000 ~10^8; the bound is reached in about a second
MAX_SCAN_STEPS = 2_000_000


class MarkdownTooComplex(ValueError):
    """The page's table tags would take the official scanner too long to split."""


def _blank(text: str, start: int, end: int) -> str:
    return text[:start] + " " * (end - start) + text[end:]


# ----------------------------------------------------------------------------------- pre-cleaning

_IMAGE = re.compile(r"!\[.*?\]\(.*?\)")
_FENCE_OPENERS = tuple(re.compile(rf"^```{lang}\n?", re.MULTILINE) for lang in ("markdown", "html", "latex"))
_FENCE_CLOSER = re.compile(r"```\n?$", re.MULTILINE)


def _preclean(content: str) -> str:
    content = _IMAGE.sub("", content)
    for opener in _FENCE_OPENERS:
        content = opener.sub("", content)
    content = _FENCE_CLOSER.sub("", content)
    content = re.sub(r"_{4,}", "____", content)
    content = re.sub(r" {4,}", "    ", content)
    for tag in ("<html>", "</html>", "<body>", "</body>"):
        content = content.replace(tag, "")
    return content


# ------------------------------------------------------------------------- nesting-aware scanning


def _outermost_spans(
    text: str, begin: re.Pattern[str], end: re.Pattern[str], skip: int, restart: int
) -> list[tuple[int, str]]:
    """Outermost ``begin..end`` spans as ``(start, text)``, with the official scanner's arithmetic.

    After a begin the scan jumps ``skip`` characters from its start, after an end ``skip`` characters from
    the end's start, and a span ends ``skip`` characters after its end's start (``skip`` is the length of
    the official end *pattern* string, which for ``\\\\end{tabular}`` is one more than the text it
    matches). If begins are left open the scan restarts ``restart`` characters after the first open one.
    """
    found: list[tuple[int, str]] = []
    offset, steps = 0, 0
    while True:
        pos, stack = 0, []
        b, e = begin.search(text), end.search(text)  # the next ones at or after pos, kept until passed
        while pos < len(text):
            if b is not None and b.start() < pos:
                b = begin.search(text, pos)
            if e is not None and e.start() < pos:
                e = end.search(text, pos)
            if b is None and e is None:
                break
            steps += 1
            if steps > MAX_SCAN_STEPS:
                raise MarkdownTooComplex(f"over {MAX_SCAN_STEPS} table-scan steps (unclosed table tags)")
            if b is not None and (e is None or b.start() < e.start()):
                stack.append(b.start())
                pos = b.start() + skip
            else:
                assert e is not None
                if stack:
                    start = stack.pop()
                    if not stack:
                        found.append((offset + start, text[start : e.start() + skip]))
                pos = e.start() + skip
        if not stack:
            return found
        cut = stack[0] + restart
        offset += cut
        text = text[cut:]


_TABULAR_BEGIN = re.compile(r"\\begin{tabular}")
_TABULAR_END = re.compile(r"\\end{tabular}")
_TEX_TABLE = re.compile(r"\\begin{table}(.*?)\\end{table}", re.DOTALL)
_HTML_BEGIN = re.compile(r"<table(?:[^>]*)>")
_HTML_END = re.compile(r"</table>")
# lengths of the official pattern strings, which its scanner uses as jump widths
_TABULAR_SKIP, _TABULAR_RESTART = len(r"\\end{tabular}"), len(r"\\begin{tabular}")
_HTML_SKIP, _HTML_RESTART = len("</table>"), len(r"<table(?:[^>]*)>")


def _latex_tables(content: str) -> list[tuple[int, str]]:
    tables = []
    for m in _TEX_TABLE.finditer(content):
        tables.append((m.start(), m.group(0)))
        content = _blank(content, m.start(), m.end())
    tables += _outermost_spans(content, _TABULAR_BEGIN, _TABULAR_END, _TABULAR_SKIP, _TABULAR_RESTART)
    return sorted(tables, key=lambda t: t[0])


# ------------------------------------------------------------------------------ markdown tables

_MD_ROW = re.compile(r"\|\s*.*?\s*\|\n", re.DOTALL)
_HTML_TABLE_SPAN = re.compile(r"(<table.*?</table>)", re.DOTALL)
_TABLE_STRUCTURE_LINE = re.compile(r"</?t(able|head|body)>")


def markdown_table_to_html(markdown_table: str) -> str:
    """A pipe table to HTML: first row ``th`` cells, second row skipped (the separator), rest ``td``."""
    rows = [row.strip() for row in markdown_table.strip().split("\n")]
    parts = ["<table>\n  <thead>\n    <tr>\n"]
    parts += [f"      <th>{cell.strip()}</th>\n" for cell in rows[0].split("|")[1:-1]]
    parts.append("    </tr>\n  </thead>\n  <tbody>\n")
    for row in rows[2:]:
        parts.append("    <tr>\n")
        parts += [f"      <td>{cell.strip()}</td>\n" for cell in row.split("|")[1:-1]]
        parts.append("    </tr>\n")
    parts.append("  </tbody>\n</table>\n")
    return "".join(parts)


def _looks_like_separator(line: str) -> bool:
    """Official ``find_md_table_mode``: true for any line with ``:`` or ``---`` (cells included)."""
    return ":" in line or "---" in line


def _merge_row_tables(block: str) -> str:
    """Join the one-row tables of a block into one table (official ``merge_tables``)."""
    block = re.sub(r"<!--[\s\S]*?-->", "", block)
    rows: list[str] = []
    for table in re.findall(r"<table>[\s\S]*?</table>", block):
        lines = [
            line.replace("<th>", "<td>").replace("</th>", "</td>") if "<th>" in line else line
            for line in table.split("\n")
        ]
        kept = [line for line in lines if not _TABLE_STRUCTURE_LINE.search(line)]
        if len(kept) > 2:
            rows += kept
    return "\n\n<table>\n{}\n</table>\n\n".format("\n".join(rows))


def _merge_adjacent_tables(text: str) -> str:
    """Official ``replace_table_with_placeholder``: walks lines one behind, collecting consecutive tables.

    Reproduced as is: the line just before a table is swallowed by it, separator-looking lines inside a
    table block are dropped, and an empty first line is emitted.
    """
    out: list[str] = []
    in_table, block, last = False, "", ""
    for line in text.split("\n"):
        if "<table>" in line:
            in_table = True
            block += last
        elif in_table:
            if not _looks_like_separator(last) and "</thead>" not in last:
                block += "\n" + last
            if "</table>" in last and "<table>" not in line:
                in_table = False
                out.append(_merge_row_tables(block))
                block = ""
        else:
            out.append(last)
        last = line
    if last:
        if in_table or "</table>" in last:
            out.append(_merge_row_tables(block + "\n" + last))
        else:
            out.append(last)
    return "\n".join(out)


def _convert_markdown_tables(content: str) -> str:
    content = content.replace("\r", "") + "\n"
    for row in _MD_ROW.findall(content):
        content = content.replace(row, markdown_table_to_html(row), 1)
    content = _merge_adjacent_tables(content)
    return content.replace("<table>", '<table border="1" >').replace("<td>", '<td colspan="1" rowspan="1">')


# ------------------------------------------------------------------------------------------ math

_MATH = re.compile(r"\$\$(.*?)\$\$|\\\[(.*?)\\\]|\$(.*?)\$|\\\((.*?)\\\)", re.DOTALL)
_DOLLARS = re.compile(r"\$\$(.*?)\$\$|\$(.*?)\$|\\\((.*?)\\\)", re.DOTALL)


def _math_blocks(content: str) -> Iterator[tuple[PredBlock, int, bool]]:
    """Yield each math span as a formula block, its end, and whether it is cut out of the text."""
    for m in _MATH.finditer(content):
        line = " ".join(m.group(0).strip().split("\n"))
        dollars = _DOLLARS.search(line)
        if dollars is None:  # \[..\]
            yield PredBlock(FORMULA, m.start(), line), m.end(), True
        elif dollars.group(1):  # $$..$$ (or \[..\] holding one)
            yield PredBlock(FORMULA, m.start(), _DOLLARS.sub(r"\\[\1\\]", line)), m.end(), True
        else:  # $..$ or \(..\), kept in the text as well
            block = PredBlock(FORMULA, m.start(), _DOLLARS.sub(r"\\[\2\3\\]", line), INLINE)
            yield block, m.end(), False


# ----------------------------------------------------------------------------------------- parse

_CODE = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)
_LATEX_WRAPPERS = (
    (re.compile(r"\\title\{(.*?)\}"), r"\1"),
    (re.compile(r"\\title\s*\{\s*(.*?)\s*\}", re.DOTALL), r"\1"),
    (re.compile(r"\\text\s*\{\s*(.*?)\s*\}", re.DOTALL), r"\1"),
    (re.compile(r"\\section\*?\{(.*?)\}"), r"\1"),
    (re.compile(r"\\section\*?\{\s*(.*?)\s*\}", re.DOTALL), r"\1"),
)


def _paragraph_blocks(content: str) -> Iterator[PredBlock]:
    parts = content.split("\n\n")
    if len(parts) == 1:
        parts = content.split("\n")
    position = 0
    for part in parts:
        start = position
        position += len(part)  # (the official offsets leave out the separators)
        text = "\n".join(line.strip() for line in part.strip().strip("\n").split("\n") if line.strip())
        if not text:
            continue
        if text.startswith("<table") and text.endswith("</table>"):
            yield PredBlock(HTML_TABLE, start, text)
        elif text.startswith("$") and text.endswith("$"):
            if text.replace("$", "").strip():
                yield PredBlock(FORMULA, start, text.strip())
        else:
            yield PredBlock(TEXT, start, text, "text_block")


def parse_markdown(content: str) -> dict[str, list[PredBlock]]:
    """Blocks of one page by kind (``text_all``, ``equation_isolated``, ``html_table``, ``latex_table``).

    Kinds appear in the order their first block appears on the page and blocks are sorted by position
    (stable), as in the official ``md_tex_filter`` result.
    """
    content = _preclean(content)
    blocks: list[PredBlock] = []

    for start, table in _latex_tables(content):
        blocks.append(PredBlock(LATEX_TABLE, start, table))
        content = _blank(content, start, start + len(table))

    for start, table in _outermost_spans(content, _HTML_BEGIN, _HTML_END, _HTML_SKIP, _HTML_RESTART):
        blocks.append(PredBlock(HTML_TABLE, start, table))
        content = _blank(content, start, start + len(table))

    for block, end, cut in list(_math_blocks(content)):
        blocks.append(block)
        if cut:
            content = _blank(content, block.start, end)

    if len(_MD_ROW.findall(content + "\n")) >= 2:
        content = _convert_markdown_tables(content)
        for m in list(_HTML_TABLE_SPAN.finditer(content)):
            content = _blank(content, m.start(), m.end())
            blocks.append(PredBlock(HTML_TABLE, m.start(), m.group(0).strip(), MD_TABLE))

    for m in list(_CODE.finditer(content)):
        content = _blank(content, m.start(), m.end())
        blocks.append(PredBlock(TEXT, m.start(), m.group(2).strip(), "code"))

    for pattern, replacement in _LATEX_WRAPPERS:
        content = pattern.sub(replacement, content)
    blocks += _paragraph_blocks(content)

    by_kind: dict[str, list[PredBlock]] = {}
    for block in sorted(blocks, key=lambda b: b.start):
        by_kind.setdefault(block.kind, []).append(block)
    return by_kind
