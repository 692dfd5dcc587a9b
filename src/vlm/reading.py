"""Reading your own files with a trained checkpoint: images or PDFs in, one text per page out (`read.py`).

Pages go through the benchmarks' own path: each page is an `Item` made into a sample by
`vlm.eval.runner.GenerationSet` (the model's `SampleProcessor`: its image preprocessing, its prompt
with the `<image>` placeholders), batched by `GenerationCollator` (left-padded prompts) and decoded by
`VLMModule.predict_text` with the checkpoint's `generation:` settings (greedy by default; DeepSeek-OCR's
no-repeat n-gram guard when `no_repeat_ngram_size` > 0), which `read_files` may override.

Inputs: image files (`IMAGE_EXTENSIONS`), PDFs (each page rasterised as olmOCR's pages were for training,
`vlm.data.sources.olmocr.rasterise`, with pypdfium2), and folders (their readable files, sorted, not
recursing). A missing file, an image that does not decode or a PDF that does not open is skipped with a
warning naming it and counted (`Reading.failed`); the other pages are read.

Timing: a batch's pages are decoded together, so each page's `seconds` is its share of its batch's wall
time (loading or rendering, preprocessing and generation); `Reading.totals()` has the sums.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlm import IMAGE_TOKEN
from vlm.data.processing import IMAGE_EXTENSIONS, SampleProcessor, to_device
from vlm.eval.benchmarks.base import ImageSource, Item
from vlm.eval.runner import GenerationCollator, GenerationSet

if TYPE_CHECKING:
    from vlm.training.module import VLMModule

log = logging.getLogger(__name__)
PDF_EXTENSIONS = ("pdf",)
READABLE_EXTENSIONS = (*IMAGE_EXTENSIONS, *PDF_EXTENSIONS)
DEFAULT_DPI = 100.0  # as `python -m vlm.app.prepare olmocr` rasterises training pages
PDF_INSTALL_HINT = "pip install pypdfium2"


class UnreadableInput(ValueError):
    """A file, or a page of one, that cannot be read; the message names it."""


@dataclass
class Page:
    """One page to read: an image file (page 1 of 1) or page `page` of a PDF with `pages` pages."""

    file: str
    page: int = 1
    pages: int = 1

    @property
    def is_pdf(self) -> bool:
        return Path(self.file).suffix.lower().lstrip(".") in PDF_EXTENSIONS

    @property
    def name(self) -> str:
        return f"{self.file} (page {self.page} of {self.pages})" if self.is_pdf else self.file


@dataclass
class PageText:
    """What was read on a page, and its share of its batch's wall time."""

    file: str
    page: int
    pages: int
    text: str
    seconds: float
    batch: int


@dataclass
class Failure:
    """A file or page that was skipped (page None: the whole file), and why."""

    file: str
    page: int | None
    error: str


@dataclass
class Reading:
    """The pages read (in input order), the files and pages skipped, and the settings used."""

    pages: list[PageText] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    seconds: float = 0.0  # wall time of reading, batches and listing together (model loading excluded)
    settings: dict[str, Any] = field(default_factory=dict)

    def totals(self) -> dict[str, Any]:
        read = len(self.pages)
        return {
            "files": len({page.file for page in self.pages} | {failure.file for failure in self.failed}),
            "pages_read": read,
            "failed": len(self.failed),
            "seconds": self.seconds,
            "seconds_per_page": self.seconds / read if read else None,
            "pages_per_second": read / self.seconds if read and self.seconds > 0 else None,
        }

    def to_json(self, **extra: Any) -> dict[str, Any]:
        """The JSON `read.py --json` writes: settings, totals (and `extra`, e.g. model loading time),
        each page with its text and seconds, each skipped file or page with why."""
        return {
            **self.settings,
            "totals": self.totals() | extra,
            "pages": [asdict(page) for page in self.pages],
            "failed": [asdict(failure) for failure in self.failed],
        }


# -- the checkpoint -------------------------------------------------------------------------------
def load_reader(ckpt: str | Path, device: str = "auto") -> VLMModule:
    """The checkpoint's VLMModule (`vlm.training.checkpointing.load_module`: weights-only, strict), in eval mode on
    `device` (`auto`: the GPU when there is one)."""
    from vlm.training.checkpointing import load_module

    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"--ckpt {ckpt} is not a file")
    module = load_module(ckpt)
    if module.model.context != "vision":
        raise ValueError(
            f"{ckpt}: its model reads texts in place of images (context={module.model.context}); reading "
            "files needs a checkpoint of the vision arm"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return module.to(device).eval()


def default_prompt(cfg) -> str:
    """The prompt the checkpoint was trained to read with: its rendered data's (`data.source.prompt`,
    which `benchmark=synthetic` reads back with), else the olmOCR page prompt that
    `python -m vlm.app.prepare olmocr` writes into real pages' shards (the mix's OCR source)."""
    from vlm.data.sources.olmocr import DEFAULT_PROMPT

    source = (cfg.get("data") or {}).get("source") or {}
    prompt = source.get("prompt") if hasattr(source, "get") else None
    return prompt if isinstance(prompt, str) and prompt else DEFAULT_PROMPT


def check_reading_prompt(prompt: str) -> str:
    """A prompt for one page: at most one `<image>` (none: it goes first, as `encode_prompt` puts it)."""
    if prompt.count(IMAGE_TOKEN) > 1:
        raise ValueError(f"--prompt reads one page at a time: give at most one {IMAGE_TOKEN}, got {prompt!r}")
    return prompt


def override_generation(module: VLMModule, **settings: Any) -> dict[str, Any]:
    """Set the given `generation:` settings of `module` (None: keep the checkpoint's) and return the
    decoding settings `predict_text` will use."""
    generation = module.cfg.generation
    for name, value in settings.items():
        if value is not None:
            generation[name] = value
    names = ("temperature", "top_p", "no_repeat_ngram_size", "ngram_window", "ngram_exempt_ids")
    used = {name: generation.get(name) for name in names}
    used["ngram_exempt_ids"] = list(used["ngram_exempt_ids"] or [])
    return used


# -- inputs ---------------------------------------------------------------------------------------
def find_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[Failure]]:
    """The files to read, in the order given (a folder: its images and PDFs, sorted by name), and the
    paths that name nothing readable."""
    files, failed = [], []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                p
                for p in path.iterdir()
                if p.is_file() and p.suffix.lower().lstrip(".") in READABLE_EXTENSIONS
            )
            files += found
            if not found:
                failed.append(Failure(str(path), None, f"{path} holds no images or PDFs"))
        elif path.is_file():
            files.append(path)
        else:
            failed.append(Failure(str(path), None, f"{path} does not exist"))
    return files, failed


def pdf_page_count(path: Path) -> int:
    """How many pages the PDF at `path` has; UnreadableInput naming it when it does not open, has no
    pages, or pypdfium2 is not installed."""
    try:
        import pypdfium2 as pdfium
    except ImportError as error:
        raise UnreadableInput(
            f"{path} is a PDF and reading PDFs needs pypdfium2, which is not installed: {PDF_INSTALL_HINT}"
        ) from error
    try:
        pdf = pdfium.PdfDocument(str(path))
    except Exception as error:  # pypdfium2 raises PdfiumError (a plain Exception) for every failure
        raise UnreadableInput(f"{path} is not a readable PDF: {type(error).__name__}: {error}") from error
    try:
        pages = len(pdf)
    finally:
        pdf.close()
    if pages == 0:
        raise UnreadableInput(f"{path} has no pages")
    return pages


def list_pages(files: Sequence[Path]) -> tuple[list[Page], list[Failure]]:
    """Every page of `files` in order (an image: one page), and the PDFs that cannot be opened."""
    pages, failed = [], []
    for path in files:
        page = Page(str(path))
        if not page.is_pdf:
            pages.append(page)
            continue
        try:
            count = pdf_page_count(path)
        except UnreadableInput as error:
            failed.append(Failure(str(path), None, str(error)))
            continue
        pages += [Page(str(path), number, count) for number in range(1, count + 1)]
    return pages, failed


def page_image(page: Page, dpi: float = DEFAULT_DPI) -> ImageSource:
    """What `Item` loads for a page: an image file's path (decoded, checked, by `Item.load_images`), or a
    PDF page rasterised at `dpi` with the long side capped as for training pages."""
    if not page.is_pdf:
        return Path(page.file)
    from vlm.data.skips import Skip
    from vlm.data.sources.olmocr import DEFAULT_MAX_SIDE, rasterise

    try:
        return rasterise(Path(page.file), page.page, dpi, DEFAULT_MAX_SIDE)
    except ImportError as error:
        raise UnreadableInput(f"{page.name}: reading PDFs needs pypdfium2: {PDF_INSTALL_HINT}") from error
    except Skip as error:
        raise UnreadableInput(f"{page.name}: {error}") from error


# -- reading --------------------------------------------------------------------------------------
def batches(pages: Sequence[Page], size: int) -> Iterator[list[tuple[int, Page]]]:
    """(index, page) in runs of `size`."""
    for start in range(0, len(pages), size):
        yield list(enumerate(pages[start : start + size], start))


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 autocast on a GPU (as eval.py's trainer), full precision on the CPU."""
    if precision == "auto":
        return "bf16-mixed" if device.type == "cuda" else "32-true"
    if precision not in ("bf16-mixed", "32-true"):
        raise ValueError(f"precision={precision!r}: expected auto, bf16-mixed or 32-true")
    return precision


def read_files(
    module: VLMModule,
    paths: Iterable[str | Path],
    *,
    prompt: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    no_repeat_ngram_size: int | None = None,
    ngram_window: int | None = None,
    dpi: float = DEFAULT_DPI,
    precision: str = "auto",
    progress: bool | None = None,
    on_page: Callable[[PageText], None] | None = None,
) -> Reading:
    """Read every page of `paths` (images, PDFs, folders of them) with `module` (`load_reader`), in batches
    of `batch_size` pages. `prompt` (default: `default_prompt`, the checkpoint's training prompt),
    `max_new_tokens` and the n-gram guard default to the checkpoint's settings. `on_page` is called with
    each page as soon as its batch is read (in input order). `progress`: a progress bar on stderr (None:
    when there are more pages than a batch and stderr is a terminal). Unreadable files and pages are
    skipped, warned about and listed in `Reading.failed`."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected at least 1")
    start = time.perf_counter()
    prompt = check_reading_prompt(default_prompt(module.cfg) if prompt is None else prompt)
    max_new_tokens = int(module.cfg.generation.max_new_tokens if max_new_tokens is None else max_new_tokens)
    generation = override_generation(
        module, no_repeat_ngram_size=no_repeat_ngram_size, ngram_window=ngram_window
    )
    device = module.device
    precision = resolve_precision(precision, device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
    )
    processor = SampleProcessor.for_model(module.model, int(module.cfg.max_length), train=False)
    collate = GenerationCollator(module.model.tokenizer.pad_id)
    reading = Reading(
        settings={
            "prompt": prompt,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "dpi": dpi,
            "device": str(device),
            "precision": precision,
            "generation": generation,
        }
    )
    files, reading.failed = find_files(paths)
    pages, failed = list_pages(files)
    reading.failed += failed
    for failure in reading.failed:
        log.warning("skipped: %s", failure.error)
    bar = tqdm(
        total=len(pages),
        unit="page",
        desc="reading",
        disable=(None if progress is None else not progress) if len(pages) > batch_size else True,
    )
    module.eval()
    with bar:
        for number, batch_pages in enumerate(batches(pages, batch_size)):
            batch_start = time.perf_counter()
            loaded, errors = [], {}
            for index, page in batch_pages:
                try:
                    loaded.append((index, Item(page.name, page_image(page, dpi), prompt)))
                except UnreadableInput as error:
                    errors[index] = str(error)
            samples = GenerationSet([item for _, item in loaded], processor)  # loads and checks the images
            good = []
            for position, (index, _) in enumerate(loaded):
                sample = samples[position]
                if "error" in sample:
                    errors[index] = sample["error"]
                else:
                    good.append((index, sample))
            texts = {}
            if good:
                batch = to_device(collate([sample for _, sample in good]), device)
                with autocast:
                    predicted = module.predict_text(batch, max_new_tokens)
                texts = dict(zip([index for index, _ in good], predicted, strict=True))
            share = (time.perf_counter() - batch_start) / max(1, len(texts))
            for index, page in batch_pages:
                if index in texts:
                    result = PageText(page.file, page.page, page.pages, texts[index], share, number)
                    reading.pages.append(result)
                    if on_page is not None:
                        on_page(result)
                else:
                    reading.failed.append(Failure(page.file, page.page, errors[index]))
                    log.warning("skipped: %s", errors[index])
            bar.update(len(batch_pages))
    reading.seconds = time.perf_counter() - start
    return reading


def page_header(page: PageText) -> str:
    """The line printed before a page's text when several pages are read."""
    where = f" (page {page.page} of {page.pages})" if page.pages > 1 else ""
    return f"==> {page.file}{where} <=="
