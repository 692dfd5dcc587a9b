"""The built-in dataset: English prose rendered with Pillow, written once as webdataset shards.

python -m vlm.app.synthetic                      # the default config (conf/data/synthetic.yaml)
python -m vlm.app.synthetic data.source.num_train=1000 data.source.image_size=[64,256]
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import ClassVar

from PIL import Image
from tqdm import tqdm

from vlm import corpus
from vlm.data.render import TextDoesNotFit, find_font, random_style, render
from vlm.data.shards import INDEX_FILE, read_index, write_index, write_shards

log = logging.getLogger(__name__)


@dataclass
class RenderedShards:
    """Rendered samples written once as shards, one folder per recipe: `prepare()` renders on first use
    and returns the shard paths per split. Subclasses say what to render (`jobs`, `render_one`);
    `SyntheticText` (OCR lines) and `vlm.data.longdoc.LongDoc` (multi-page documents) share this."""

    source_name: ClassVar[str] = "rendered"
    root: str = "data/synthetic"
    image_size: tuple[int, int] = (32, 512)  # (height, width)
    min_chars: int = 32
    max_chars: int = 64
    num_train: int = 32000
    num_val: int = 512
    num_test: int = 512
    samples_per_shard: int = 500
    fonts: list[str] = field(default_factory=lambda: ["DejaVuSans", "DejaVuSerif", "DejaVuSansMono"])
    font_sizes: list[int] = field(default_factory=lambda: [13, 14, 15])
    seed: int = 0
    workers: int = 2

    def __post_init__(self) -> None:
        self.image_size = tuple(self.image_size)
        self.fonts, self.font_sizes = list(self.fonts), list(self.font_sizes)

    @property
    def directory(self) -> Path:
        """One folder per generation recipe, so a changed config never reuses stale shards."""
        recipe = {k: v for k, v in asdict(self).items() if k not in ("root", "workers")}
        recipe["python"] = list(sys.version_info[:2])  # the corpus comes from Python's own docs
        digest = hashlib.sha1(json.dumps(recipe, sort_keys=True, default=list).encode()).hexdigest()[:8]
        height, width = self.image_size
        name = f"{height}x{width}_{self.min_chars}-{self.max_chars}chars_seed{self.seed}_{digest}"
        return Path(self.root) / name

    def counts(self) -> dict[str, int]:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}

    def sample_counts(self) -> dict[str, int]:
        """Samples actually written per split (texts that did not fit the image are left out)."""
        self.prepare()
        return {split: info["samples"] for split, info in read_index(self.directory)["splits"].items()}

    def prepare(self) -> dict[str, list[str]]:
        """Shard paths per split, rendering them first if this recipe has not been written yet."""
        index = read_index(self.directory)
        if index is None:
            self._write()
            index = read_index(self.directory)
        return {
            split: [str(self.directory / name) for name in info["shards"]]
            for split, info in index["splits"].items()
        }

    def available_fonts(self) -> list[str | None]:
        """The configured fonts installed here (a warning names the others); none: Pillow's own."""
        available = [f for f in self.fonts if find_font(f)]
        missing = sorted(set(self.fonts) - set(available))
        if missing:
            log.warning("fonts not installed, skipped: %s", ", ".join(missing))
        return available or [None]

    def jobs(self, split: str, count: int, fonts: list[str | None]) -> list[tuple]:
        """What `render_one` renders for a split, one picklable job per sample (made in this process)."""
        raise NotImplementedError

    def render_one(self, job: tuple) -> dict | None:
        """One sample in the shard schema (`vlm.data.shards`), or None when its text does not fit."""
        raise NotImplementedError

    def _write(self) -> None:
        fonts = self.available_fonts()
        # a folder of this process's own: two runs that render the same recipe at once do not collide
        tmp = self.directory.with_name(f"{self.directory.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        splits = {}
        for split, count in self.counts().items():
            jobs = self.jobs(split, count, fonts)
            pool = Pool(self.workers) if self.workers > 1 else None
            try:
                rendered = (
                    pool.imap(self.render_one, jobs, chunksize=64) if pool else map(self.render_one, jobs)
                )
                progress = tqdm(
                    rendered, total=len(jobs), desc=f"rendering {split}", unit="sample", disable=None
                )
                samples = [s for s in progress if s is not None]
            finally:
                if pool:
                    pool.close()
            shards = write_shards(samples, tmp, split, self.samples_per_shard)
            splits[split] = {
                "samples": len(samples),
                "skipped_does_not_fit": len(jobs) - len(samples),
                "shards": [Path(s).name for s in shards],
            }
        write_index(tmp, {"source": self.source_name, "recipe": asdict(self), "splits": splits})
        try:
            tmp.replace(self.directory)
        except OSError:  # another process wrote the same recipe first: the same shards, keep those
            if not (self.directory / INDEX_FILE).is_file():
                raise
            shutil.rmtree(tmp)
        log.info("wrote %s", self.directory)


@dataclass
class SyntheticText(RenderedShards):
    """Rendered-text OCR samples: one line of prose per image, the text as the answer."""

    source_name: ClassVar[str] = "synthetic"
    prompt: str = "<image>\nRead the text."

    def jobs(self, split: str, count: int, fonts: list[str | None]) -> list[tuple]:
        texts = corpus.snippets(split, count, self.min_chars, self.max_chars, self.seed)
        return [(split, i, text, fonts) for i, text in enumerate(texts)]

    def render_one(self, job: tuple) -> dict | None:
        split, index, text, fonts = job
        rng = random.Random(f"{self.seed}-{split}-{index}")
        style = random_style(rng, fonts, self.font_sizes)
        try:
            image = render(text, self.image_size, style)
        except TextDoesNotFit:
            return None
        return {
            "key": f"{split}-{index:07d}",
            "image": png_bytes(image),
            "image_ext": "png",
            "task": "ocr",
            "prompt": self.prompt,
            "answers": [text],
            "meta": {"source": "synthetic", "split": split, "font": style.font, "font_size": style.font_size},
        }


def png_bytes(image: Image.Image) -> bytes:
    """A rendered (gray) image as grayscale PNG bytes."""
    buffer = io.BytesIO()
    image.convert("L").save(buffer, format="PNG")
    return buffer.getvalue()
