"""Render text into images with Pillow, with the exact text as ground truth."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT_DIRS = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "/Library/Fonts",
    "/System/Library/Fonts",
    "C:/Windows/Fonts",
    str(Path.home() / ".fonts"),
)


class TextDoesNotFit(ValueError):
    pass


@functools.lru_cache
def find_font(name: str) -> str | None:
    """Path of a TrueType font file called `name` (e.g. "DejaVuSans") on this machine, or None."""
    for root in FONT_DIRS:
        if Path(root).is_dir():
            for path in sorted(Path(root).rglob(f"{name}.*")):
                if path.suffix.lower() in (".ttf", ".otf"):
                    return str(path)
    return None


@functools.lru_cache(maxsize=64)
def load_font(name: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The named font, or Pillow's built-in font at `size` when the name is None or not installed."""
    path = find_font(name) if name else None
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size)


@dataclass(frozen=True)
class RenderStyle:
    font: str | None
    font_size: int
    ink: int = 0  # gray level of the text
    paper: int = 255  # gray level of the background
    jitter: tuple[int, int] = (0, 0)  # offset of the text block in pixels


def wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word wider than a line raises TextDoesNotFit."""
    lines: list[str] = []
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
        elif font.getlength(word) <= width:
            lines.append(word)
        else:
            raise TextDoesNotFit(f"word {word!r} is wider than {width}px")
    return lines


def line_layout(font, height: int, margin: int) -> tuple[int, int]:
    """(line height, lines that fit) for `font` in an image `height` pixels high: the last line's
    descent may reach into the bottom margin."""
    # a bitmap font (Pillow without FreeType) has no metrics: its glyph box stands for them
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (font.getbbox("Ag")[3], 0)
    line_height = ascent + descent
    return line_height, (height - 2 * margin + descent) // line_height


def render(text: str, size: tuple[int, int], style: RenderStyle, margin: int = 4) -> Image.Image:
    """An RGB image of `size` (height, width) showing `text` wrapped to the width, top-left aligned."""
    height, width = size
    font = load_font(style.font, style.font_size)
    lines = wrap(text, font, width - 2 * margin)
    line_height, fit = line_layout(font, height, margin)
    if len(lines) > fit:
        raise TextDoesNotFit(f"{len(lines)} lines of {line_height}px do not fit in {height}px: {text!r}")
    image = Image.new("RGB", (width, height), (style.paper,) * 3)
    draw = ImageDraw.Draw(image)
    free_y = max(0, height - 2 * margin - len(lines) * line_height)
    x = margin + min(style.jitter[0], max(0, width - 2 * margin - max(font.getlength(s) for s in lines)))
    y = margin + min(style.jitter[1], free_y)
    for i, line in enumerate(lines):
        draw.text((x, y + i * line_height), line, font=font, fill=(style.ink,) * 3)
    return image


def random_style(
    rng: random.Random, fonts: list[str | None], font_sizes: list[int], max_jitter: int = 4
) -> RenderStyle:
    return RenderStyle(
        font=rng.choice(fonts),
        font_size=rng.choice(font_sizes),
        ink=rng.randint(0, 60),
        paper=rng.randint(215, 255),
        jitter=(rng.randint(0, max_jitter), rng.randint(0, max_jitter)),
    )
