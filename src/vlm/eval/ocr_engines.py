"""External OCR engines as a baseline arm: Tesseract or RapidOCR reads a benchmark's images and writes the
predictions in that benchmark's own format, which `eval.py predictions=` scores like any model's.

python -m vlm.app.ocr_engines --engine tesseract benchmark=synthetic
python -m vlm.app.ocr_engines --engine rapidocr benchmark=synthetic_compression benchmark.image_size=[32,512]
python -m vlm.app.ocr_engines --engine tesseract --psm 3 benchmark=fox benchmark.data_dir=/data/Fox/...

Everything after the engine's options is an eval.py override (`benchmark=`, `benchmark.*=`, `data.*=`,
`data_config=`, `paths.*=`), so the items are the ones eval.py rebuilds without a checkpoint; the command
that scores the predictions is printed at the end. Tesseract is the system binary (`apt-get install
tesseract-ocr`); RapidOCR is `pip install -e ".[ocr]"` (`make ocr`), its PP-OCR models inside the wheel.
"""

from __future__ import annotations

import importlib.metadata
import io
import logging
import shutil
import subprocess
import time
from typing import ClassVar

from PIL import Image
from tqdm import tqdm

from vlm.eval.benchmarks.base import Item

log = logging.getLogger(__name__)


TIMING_FILE = "timing.json"  # beside the predictions: the engine, its settings and ms per image


class EngineUnavailable(RuntimeError):
    """The engine is not installed; the message says how to install it."""


class Tesseract:
    """The `tesseract` binary, one process per image (PNG on stdin, text on stdout)."""

    name = "tesseract"

    def __init__(self, psm: int = 7, lang: str = "eng", timeout: float = 120.0) -> None:
        binary = shutil.which("tesseract")
        if binary is None:
            raise EngineUnavailable(
                "no `tesseract` on PATH: install it with `apt-get install tesseract-ocr` (or use --engine rapidocr)"
            )
        listed = subprocess.run([binary, "--list-langs"], capture_output=True, text=True).stdout
        installed = listed.splitlines()[1:]  # after the heading "List of available languages ..."
        missing = [code for code in lang.split("+") if code not in installed]
        if missing:
            raise EngineUnavailable(
                f"tesseract has no language data for {', '.join(missing)}: "
                f"apt-get install {' '.join(f'tesseract-ocr-{code}' for code in missing)}"
            )
        self.command = [binary, "stdin", "stdout", "--psm", str(psm), "-l", lang]
        self.timeout = timeout
        version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
        self.version = version.splitlines()[0] if version else "tesseract"
        self.settings = f"--psm {psm} -l {lang}"

    def read(self, image: Image.Image) -> str:
        png = io.BytesIO()
        image.save(png, format="PNG")
        done = subprocess.run(self.command, input=png.getvalue(), capture_output=True, timeout=self.timeout)
        if done.returncode != 0:
            error = done.stderr.decode("utf-8", "replace").strip()
            raise RuntimeError(f"tesseract exited with {done.returncode}: {error}")
        lines = done.stdout.decode("utf-8", "replace").splitlines()
        return "\n".join(line.strip() for line in lines if line.strip())  # no blank lines or form feed


class RapidOCR:
    """rapidocr_onnxruntime: PP-OCR detection, orientation and recognition models shipped in its wheel."""

    name = "rapidocr"
    # The detector sees the longer side at most 960 px (PaddleOCR's default; RapidOCR's own scales the
    # shorter side to 736, a 32x512 line to 736x11776: 5x slower, its spaces lost); its boxes are
    # expanded more (unclip ratio 2.0, default 1.6), and text read with low confidence is kept, not
    # dropped (why: docs/results.md, "RapidOCR's settings").
    options: ClassVar[dict] = {
        "det_limit_type": "max",
        "det_limit_side_len": 960,
        "det_unclip_ratio": 2.0,
        "text_score": 0.1,
    }

    def __init__(self) -> None:
        try:
            from rapidocr_onnxruntime import RapidOCR as Engine
        except ImportError as error:
            raise EngineUnavailable(
                "rapidocr_onnxruntime is not installed: `make ocr` or `pip install -e '.[ocr]'`"
            ) from error
        self.engine = Engine(**self.options)
        self.version = f"rapidocr_onnxruntime {importlib.metadata.version('rapidocr_onnxruntime')}"
        self.settings = " ".join(f"{key}={value}" for key, value in self.options.items())

    def read(self, image: Image.Image) -> str:
        detections, _ = self.engine(image.convert("RGB"))
        return reading_order(detections or [])


def reading_order(detections: list) -> str:
    """Detected boxes `[corners, text, score]` joined into lines (vertical centres within half a box height
    of the line's first box), each line left to right, the lines top to bottom."""
    boxes = []
    for corners, text, _score in detections:
        xs, ys = [x for x, _ in corners], [y for _, y in corners]
        boxes.append(((min(ys) + max(ys)) / 2, (max(ys) - min(ys)) / 2, min(xs), text.strip()))
    lines: list[list[tuple]] = []
    for box in sorted(boxes):
        centre, half_height = box[0], box[1]
        if lines and abs(centre - lines[-1][0][0]) <= max(half_height, lines[-1][0][1]):
            lines[-1].append(box)
        else:
            lines.append([box])
    return "\n".join(" ".join(text for *_, text in sorted(line, key=lambda b: b[2])) for line in lines)


ENGINES = {"tesseract": Tesseract, "rapidocr": RapidOCR}


def build_engine(name: str, psm: int = 7, lang: str = "eng") -> Tesseract | RapidOCR:
    """The engine `name`; EngineUnavailable (saying how to install it) when it is not installed."""
    if name not in ENGINES:
        raise ValueError(f"unknown OCR engine {name!r}; choose from {', '.join(ENGINES)}")
    return Tesseract(psm, lang) if name == "tesseract" else RapidOCR()


def read_items(engine: Tesseract | RapidOCR, items: list[Item]) -> tuple[dict[str, str], float]:
    """{key: text} of every item whose images load and read (pages joined by newlines), and the engine's
    seconds per image. An item that fails gets no prediction (the benchmark's rule for missing ones)."""
    predictions: dict[str, str] = {}
    seconds, images = 0.0, 0
    for item in tqdm(items, desc=engine.name, unit="item"):
        try:
            texts = []
            for page in item.load_images():
                start = time.perf_counter()
                texts.append(engine.read(page))
                seconds += time.perf_counter() - start
                images += 1
        except (FileNotFoundError, ValueError, RuntimeError, subprocess.TimeoutExpired) as error:
            log.warning("item %s gets no prediction: %s", item.key, error)
            continue
        predictions[item.key] = "\n".join(texts)
    return predictions, seconds / max(images, 1)
