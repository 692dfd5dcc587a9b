"""Encoded image bytes -> a checked PIL image -> 8-bit RGB, the same way for training, evaluation and
the converters.

`open_image` reads only the header: the pixel count is checked (`ImageTooLarge`) before anything is
decoded, and only the formats the shards hold are opened (a `.png` member that is really, say, EPS
does not reach Ghostscript). `to_rgb` converts every mode without losing the picture: transparency is
composed onto white (text on a transparent ground stays dark on light), 16- and 32-bit integer scans
are scaled to 8 bits, float images are read as 0..1 when their values lie there and stretched from
their own range otherwise.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# a 600 dpi A4 scan is 35 M pixels; decoded as RGB, 64 M pixels are 192 MB. Below Pillow's own limit
# (Image.MAX_IMAGE_PIXELS, 89.5 M), above which it warns and, at twice that, refuses.
MAX_IMAGE_PIXELS = 8192 * 8192
# the Pillow formats of IMAGE_EXTENSIONS (vlm.data.processing)
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
WHITE = (255, 255, 255)


class ImageTooLarge(ValueError):
    """An image with more pixels than allowed (said by its header; nothing was decoded)."""


def open_image(data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Encoded bytes -> a lazily opened image (header read, pixels not yet decoded).

    Raises `ImageTooLarge` above `max_pixels` (None: Pillow's limit only) or Pillow's decompression-bomb
    limit; anything else wrong with the bytes raises what Pillow raises (UnidentifiedImageError, ...)."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(str(error)) from error
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageTooLarge(f"{image.width}x{image.height} pixels, over {max_pixels}")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB. Alpha and palette transparency are composed onto white; 16/32-bit
    integer gray is scaled from its type's range (I;16: /257; I: as 16-bit when its values fit, else
    from its min..max; their transparency, rare, is ignored); float gray (F) from 0..1 when its values
    lie there, else from their min..max."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        return _gray(np.asarray(image, dtype=np.float32) / 65535)
    if image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float32)
        values = np.where(np.isfinite(values), values, np.float32(0))  # NaN and inf read as 0
        top = 65535 if image.mode == "I" else 1
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low >= 0 and high <= top:
            return _gray(values / top)
        return _gray((values - low) / (high - low or 1))
    if image.mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*WHITE, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _gray(unit: np.ndarray) -> Image.Image:
    """Gray levels in 0..1 (H, W) -> an 8-bit RGB image."""
    levels = np.rint(np.clip(unit, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(levels).convert("RGB")
