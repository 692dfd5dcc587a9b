"""Vision encoders: one module per family, all with the `VisionEncoder` interface."""

from vlm.contracts import ImagePreprocessing
from vlm.models.encoders.base import VisionEncoder
from vlm.models.encoders.tiny import TinyEncoder

__all__ = ["ImagePreprocessing", "TinyEncoder", "VisionEncoder"]
