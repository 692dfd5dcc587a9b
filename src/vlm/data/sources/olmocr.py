"""olmOCR-mix -> one sample per PDF page rasterised with pypdfium2 (task `ocr`, target: natural_text).

Two layouts, per `--split NAME=PATH[:PDF_DIR]` (repeatable):
  - a folder of page pairs as olmOCR's `prepare_olmocrmix` writes them: `X.pdf` + `X.md`, searched
    recursively; the .md (UTF-8) is YAML front matter between `---` lines (primary_language,
    is_rotation_valid, rotation_correction, is_table, is_diagram; flat `key: value`, at most 16 KiB,
    no anchors or aliases) followed by the natural text. The PDF is `X.pdf` next to the .md, else
    `PDF_DIR/<relative path of X>.pdf`. Items: .md files sorted by relative path; key
    `olmocr-<relative path without .md>`.
  - parquet files of page responses (allenai/olmOCR-mix-0225 / -1025): column `id` (and `url`,
    `page_number`, `pdf_relpath` when present), the response fields either as top-level columns or as
    one `response` column (a JSON string or a struct). PDFs come from PDF_DIR (default: the parquet's
    folder), holding the extracted PDF tarballs; accepted names, tried in order: `<id>.pdf`, the member
    name of `pdf_relpath` (`<tarball>:<member>.pdf` -> `<member>.pdf`), `<id>-<page_number>.pdf`. Items:
    rows in file order (files sorted by name); key `olmocr-<id>`.
A PDF with several pages is read at `page_number` (1-based) when the row or front matter gives one in
range, else at its first page.

    python -m vlm.app.prepare olmocr --out data/olmocr --dpi 100 --max-side 1288 \\
        --split train=/data/olmOCR-mix-1025-extracted/00_documents/train \\
        --split eval=/data/olmOCR-mix-1025-extracted/00_documents/eval
    python -m vlm.app.prepare olmocr --out data/olmocr \\
        --split train=/data/olmOCR-mix-0225/train-s2pdf.parquet:/data/olmOCR-mix-0225/pdfs

Rasterising: --dpi (default 100) scales the page (72 PDF units per inch); --max-side (default 2048,
0 for none) caps the long side in pixels (the scale shrinks, never the aspect ratio). 2048 is above
what every encoder takes in (DeepEncoder large 1280; gundam a 1024 global view plus 640 px tiles, 1920
across for 3x3; SigLIP 224 to 512), so the cap loses no detail a model sees while a page stays under
4.2 M pixels: a letter page at 100 dpi (850x1100) is not touched, one at 300 dpi becomes about
1580x2048. A page over MAX_IMAGE_PIXELS (`vlm.data.sources`) is skipped before it is rendered.

Rotation: `rotation_correction` (0, 90, 180, 270) is applied as a CLOCKWISE rotation of the rendered
page, as olmOCR's own pipeline does (`img.rotate(-rotation_correction, expand=True)`), so that the
stored image is upright. Images are PNG (--image-format jpeg for JPEG). Prompt "<image>\\nRead the
page."; meta {source, id, url, page_number, primary_language, is_table, is_diagram,
rotation_correction}. Skipped: no_text (natural_text null or empty), missing_pdf, not_a_file (a pipe,
device or folder), outside_root (a PDF or page file that leads out of its folder: `..` or an absolute
path in an id or pdf_relpath, a symlink to elsewhere), bad_pdf (cannot be opened or rendered),
empty_pdf (zero pages), image_too_large, bad_encoding (a .md that is not UTF-8), unsafe_yaml (front
matter over the size cap, nested too deeply, or with anchors or aliases), malformed (a row or front
matter without the fields above, a rotation that is not a multiple of 90).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from vlm.data.sources import (
    Skip,
    Split,
    add_split_argument,
    check_pixels,
    check_prompt,
    common_kwargs,
    concat_reads,
    encode_image,
    expand_paths,
    iter_parquet,
    parquet_rows,
    path_under,
    read_file,
    safe_key,
    split_path_dir,
)

DEFAULT_PROMPT = "<image>\nRead the page."
DEFAULT_MAX_SIDE = 2048  # pixels; above every encoder's input size (see the module docstring)
MAX_FRONT_MATTER = 16 * 1024  # characters; olmOCR's front matter is five short lines
RESPONSE_FIELDS = (
    "primary_language",
    "is_rotation_valid",
    "rotation_correction",
    "is_table",
    "is_diagram",
    "natural_text",
)
PARQUET_COLUMNS = ("id", "url", "page_number", "pdf_relpath", "response", *RESPONSE_FIELDS)


class _FlatLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a few hundred bytes of aliases expand into billions of nodes."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise Skip("unsafe_yaml", f"front matter line {event.start_mark.line + 1}: an anchor or alias")
        return super().compose_node(parent, index)


def parse_markdown(text: str) -> tuple[dict, str | None]:
    """olmOCR's page file -> (front matter fields, natural text or None when there is none)."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        raise Skip("malformed", "no front matter (the file does not start with ---)")
    for end in range(1, len(lines)):
        if lines[end].strip() == "---":
            break
    else:
        raise Skip("malformed", "the front matter is not closed by ---")
    front = "".join(lines[1:end])
    if len(front) > MAX_FRONT_MATTER:
        raise Skip("unsafe_yaml", f"front matter of {len(front)} characters, more than {MAX_FRONT_MATTER}")
    try:
        fields = yaml.load(front, Loader=_FlatLoader) or {}
    except RecursionError as error:
        raise Skip("unsafe_yaml", "front matter nested too deeply") from error
    except yaml.YAMLError as error:
        raise Skip("malformed", f"front matter: {error}") from error
    if not isinstance(fields, dict):
        raise Skip("malformed", "the front matter is not a mapping")
    body = "".join(lines[end + 1 :])
    return fields, body


def _no_page_objects(data: bytes) -> bool:
    """No `/Type /Page` object in the file (its page tree is empty)."""
    return re.search(rb"/Type\s*/Page(?![A-Za-z])", data) is None


def rasterise(path: Path, page_number: int | None, dpi: float, max_side: int | None):
    """One page of a PDF as a PIL image (RGB) at `dpi`, the long side capped at `max_side`."""
    import pypdfium2 as pdfium

    data = read_file(path, "missing_pdf")
    try:
        pdf = pdfium.PdfDocument(data)
    except Exception as error:
        if getattr(error, "err_code", None) == 0 and _no_page_objects(data):
            # PDFium refuses a document without pages but reports no parse error
            raise Skip("empty_pdf", path.name) from error
        raise Skip("bad_pdf", f"{path.name}: {type(error).__name__}: {error}") from error
    try:
        pages = len(pdf)
        if pages == 0:
            raise Skip("empty_pdf", path.name)
        index = page_number - 1 if page_number and 1 <= page_number <= pages else 0
        try:
            page = pdf[index]
            width, height = page.get_size()
            scale = dpi / 72
            if max_side and max(width, height) * scale > max_side:
                scale = max_side / max(width, height)
            check_pixels(width * scale, height * scale)
            image = page.render(scale=scale).to_pil().convert("RGB")
        except Skip:
            raise
        except Exception as error:
            raise Skip("bad_pdf", f"{path.name}: {type(error).__name__}: {error}") from error
    finally:
        pdf.close()
    return image


def upright(image, rotation: int):
    """The page turned clockwise by `rotation` degrees (olmOCR's rotation_correction)."""
    return image.rotate(-rotation, expand=True) if rotation % 360 else image


@dataclass
class OlmOCRConverter:
    prompt: str = DEFAULT_PROMPT
    dpi: float = 100
    max_side: int | None = DEFAULT_MAX_SIDE
    image_format: str = "png"
    jpeg_quality: int = 90

    def __call__(self, key: str, item: dict) -> dict:
        if "markdown" in item:
            name = item["relative"] + ".md"
            data = read_file(path_under(item["root"], name), "malformed")
            try:
                fields, body = parse_markdown(data.decode("utf-8"))
            except UnicodeDecodeError as error:
                raise Skip("bad_encoding", f"{name}: {error}") from error
            except Skip as skip:
                raise Skip(skip.reason, f"{name}: {skip.message}") from skip
            fields = {**fields, "natural_text": body, "id": item["id"]}
        else:
            fields = self.row_fields(item["row"])
        natural_text = fields.get("natural_text")
        if natural_text is not None and not isinstance(natural_text, str):
            raise Skip("malformed", f"natural_text is {type(natural_text).__name__}")
        if natural_text is None or not natural_text.strip():
            raise Skip("no_text")
        rotation = fields.get("rotation_correction") or 0
        if isinstance(rotation, bool) or not isinstance(rotation, int | float) or rotation % 90:
            raise Skip("malformed", f"rotation_correction {rotation!r} is not 0, 90, 180 or 270")
        rotation = int(rotation) % 360
        page_number = fields.get("page_number")
        page_number = (
            page_number if isinstance(page_number, int) and not isinstance(page_number, bool) else None
        )
        pdf = self.find_pdf(item, fields, page_number)
        image = upright(rasterise(pdf, page_number, self.dpi, self.max_side), rotation)
        ext = "jpg" if self.image_format in ("jpg", "jpeg") else "png"
        meta = {"source": "olmocr", "id": str(fields.get("id"))}
        for name in ("url", "page_number", "primary_language", "is_table", "is_diagram"):
            if fields.get(name) is not None:
                meta[name] = fields[name]
        meta["rotation_correction"] = rotation
        return {
            "image": encode_image(image, ext, self.jpeg_quality),
            "image_ext": ext,
            "task": "ocr",
            "prompt": self.prompt,
            "answers": [natural_text.strip()],
            "meta": meta,
        }

    @staticmethod
    def row_fields(row: dict) -> dict:
        if row.get("id") in (None, ""):
            raise Skip("malformed", "no id")
        fields = dict(row)
        if all(row.get(name) is None for name in RESPONSE_FIELDS) and row.get("response") is not None:
            response = row["response"]
            if isinstance(response, str | bytes):
                try:
                    response = json.loads(response)
                except (ValueError, RecursionError) as error:  # RecursionError: nested too deep
                    raise Skip("malformed", f"response is not JSON: {error}") from error
            if not isinstance(response, dict):
                raise Skip("malformed", f"response is {type(response).__name__}, not an object")
            fields.update({name: response.get(name) for name in RESPONSE_FIELDS})
        elif not any(name in row for name in RESPONSE_FIELDS):
            raise Skip("malformed", "no response fields (natural_text, rotation_correction, ...)")
        return fields

    @staticmethod
    def find_pdf(item: dict, fields: dict, page_number: int | None) -> Path:
        if "markdown" in item:
            name = item["relative"] + ".pdf"
            pdf = path_under(item["root"], name)
            if not pdf.exists() and item.get("pdf_dir"):
                pdf = path_under(item["pdf_dir"], name)
            return pdf
        doc_id = str(fields["id"])
        names = [f"{doc_id}.pdf"]
        relpath = fields.get("pdf_relpath")
        if isinstance(relpath, str) and relpath:
            names.append(relpath.rpartition(":")[2])
        if page_number is not None:
            names.append(f"{doc_id}-{page_number}.pdf")
        candidates = [path_under(item["pdf_dir"], name) for name in names]
        return next((p for p in candidates if p.exists()), candidates[0])


def _markdown_part(folder: Path, pdf_dir: str | None) -> tuple[int, object]:
    files = sorted(folder.rglob("*.md"), key=lambda p: p.relative_to(folder).as_posix())
    items = [
        {
            "markdown": str(path),
            "root": str(folder),
            "relative": path.relative_to(folder).with_suffix("").as_posix(),
            "id": path.relative_to(folder).with_suffix("").as_posix(),
            "pdf_dir": pdf_dir,
        }
        for path in files
    ]
    return len(items), lambda start: iter(items[start:])


def _parquet_part(path: Path, pdf_dir: str) -> tuple[int, object]:
    def read(start: int):
        for row in iter_parquet(path, start, PARQUET_COLUMNS):
            yield {"row": row, "pdf_dir": pdf_dir}

    return parquet_rows(path), read


def olmocr_split(name: str, inputs: list[str | tuple]) -> Split:
    """`inputs`: folders of X.pdf + X.md pairs, or parquet paths/globs, each optionally as (path, pdf_dir)."""
    parts, names = [], []
    for entry in inputs:
        spec, pdf_dir = entry if isinstance(entry, tuple | list) else split_path_dir(str(entry))
        if Path(spec).is_dir() and not any(Path(spec).glob("*.parquet")):
            if not any(Path(spec).rglob("*.md")):
                raise FileNotFoundError(f"no .md page files under {spec}")
            parts.append(_markdown_part(Path(spec), str(pdf_dir) if pdf_dir else None))
            names.append(str(Path(spec).resolve()))
            continue
        for path in expand_paths(spec, (".parquet",)):
            if path.suffix != ".parquet":
                raise ValueError(f"{path}: olmOCR inputs are .parquet files or folders of X.pdf + X.md pairs")
            parts.append(_parquet_part(path, str(pdf_dir or path.parent)))
            names.append(str(path.resolve()))

    def key(index: int, item: dict) -> str:
        doc_id = item["id"] if "markdown" in item else item["row"].get("id")
        return f"olmocr-{safe_key(doc_id)}" if doc_id not in (None, "") else f"olmocr-item{index}"

    return Split(name, names, sum(count for count, _ in parts), concat_reads(parts), key)


def prepare_olmocr(
    out: str | Path,
    splits: dict[str, str | Path | tuple | list],
    dpi: float = 100,
    max_side: int | None = DEFAULT_MAX_SIDE,
    image_format: str = "png",
    jpeg_quality: int = 90,
    prompt: str = DEFAULT_PROMPT,
    **write_kwargs,
) -> dict:
    """olmOCR-mix -> shards under `out`; returns index.json's content.

    `splits` = {name: a pairs folder, a parquet path/glob, (parquet, pdf folder), or a list of them}.
    `write_kwargs` go to `vlm.data.prepare.write_dataset`.
    """
    from vlm.data.prepare import write_dataset

    if image_format not in ("png", "jpg", "jpeg"):
        raise ValueError(f"image_format must be png or jpeg, got {image_format!r}")
    converter = OlmOCRConverter(check_prompt(prompt), dpi, max_side, image_format, jpeg_quality)
    plans = []
    for name, inputs in splits.items():
        entries = inputs if isinstance(inputs, list) else [inputs]
        plans.append(olmocr_split(name, entries))
    return write_dataset(out, "olmocr", plans, converter, asdict(converter), **write_kwargs)


def add_arguments(parser) -> None:
    add_split_argument(
        parser,
        "NAME=PATH[:PDF_DIR]",
        "a split from a folder of X.pdf + X.md pairs, or parquet file(s) (quoted glob) with their PDF folder (repeatable)",
    )
    parser.add_argument("--dpi", type=float, default=100, help="rasterising resolution (default %(default)s)")
    parser.add_argument(
        "--max-side",
        type=int,
        default=DEFAULT_MAX_SIDE,
        help="cap on the long side of a page, in pixels; 0: none (default %(default)s, above every encoder's input)",
    )
    parser.add_argument("--image-format", choices=("png", "jpeg"), default="png", help="stored image format")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality (default %(default)s)")
    parser.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="the prompt, with one <image> (default %(default)r)"
    )


def run(args) -> dict:
    from vlm.data.sources import parse_split_specs

    return prepare_olmocr(
        splits=parse_split_specs(args.split),
        dpi=args.dpi,
        max_side=args.max_side,
        image_format=args.image_format,
        jpeg_quality=args.jpeg_quality,
        prompt=args.prompt,
        **common_kwargs(args),
    )
