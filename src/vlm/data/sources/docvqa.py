"""DocVQA -> one sample per question (task `docvqa`), from the original release JSON or HF parquet.

Two layouts, per input file (a split may list several, comma-separated or repeated):
  - the original release (RRC): `train_v1.0.json` = {dataset_name, dataset_version, data: [{questionId,
    question, image: "documents/xxx.png", docId, answers, ...}]}; an image path is looked up relative
    to the JSON's folder, then relative to --images-root, then as its file name in --images-root.
    Records are sorted by questionId.
  - the parquet files of HF `lmms-lab/DocVQA` (columns questionId, question, question_types, image
    {bytes, path}, docId, ucsf_document_id, ucsf_document_page_no, answers, data_split): rows in file
    order (files sorted by name). An image struct without bytes is read from its path like a JSON one.

    python -m vlm.app.prepare docvqa --out data/docvqa --images-root /data/docvqa/spdocvqa_images \\
        --split train=/data/docvqa/spdocvqa_qas/train_v1.0_withQT.json \\
        --split val=/data/docvqa/spdocvqa_qas/val_v1.0_withQT.json \\
        --split test=/data/docvqa/spdocvqa_qas/test_v1.0.json
    python -m vlm.app.prepare docvqa --out data/docvqa \\
        --split validation='/data/DocVQA/DocVQA/validation-*.parquet' \\
        --split test='/data/DocVQA/DocVQA/test-*.parquet'

A sample: key `docvqa-<questionId>`, the page image as it is (PNG; checked with Pillow), prompt
"<image>\\n{question}\\nAnswer briefly.", answers = all the reference answers, meta {source, questionId,
docId, question, question_types (when given)}. The test split has no answers: its samples are written
with `answers: []` and counted as `no_answers` per split in index.json; they are for prediction only
(submission to the RRC server), not for training or local scoring. Skipped: missing_image,
not_a_file (a pipe, device or folder), outside_root (an image path that leads out of the JSON's folder
or --images-root: `..`, an absolute path, a symlink to elsewhere), corrupt_image, image_too_large,
malformed (no questionId, no question, no image, answers not a list of strings).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from vlm.data.sources import (
    Skip,
    Split,
    add_split_argument,
    check_prompt,
    checked_image,
    common_kwargs,
    concat_reads,
    expand_paths,
    iter_parquet,
    parquet_rows,
    path_under,
    read_file,
    safe_key,
)

DEFAULT_PROMPT = "<image>\n{question}\nAnswer briefly."
PARQUET_COLUMNS = ("questionId", "question", "question_types", "image", "docId", "answers")


@dataclass
class DocVQAConverter:
    prompt: str = DEFAULT_PROMPT
    images_root: str | None = None
    decode_check: bool = True

    def image(self, value: object, base: str) -> bytes:
        if isinstance(value, dict):  # HF datasets' image struct
            if value.get("bytes"):
                return bytes(value["bytes"])
            value = value.get("path")
        if isinstance(value, bytes):
            return value
        if not isinstance(value, str) or not value:
            raise Skip("malformed", "no image")
        candidates = [(base, value)]
        if self.images_root:
            candidates += [(self.images_root, value), (self.images_root, Path(value).name)]
        paths = [path_under(folder, name) for folder, name in candidates]
        for path in paths:
            if path.exists():
                return read_file(path)
        raise Skip("missing_image", " or ".join(str(p) for p in dict.fromkeys(paths)))

    def __call__(self, key: str, item: dict) -> dict:
        record = item["record"]
        if record.get("questionId") in (None, ""):
            raise Skip("malformed", "no questionId")
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise Skip("malformed", "no question")
        answers = record.get("answers")
        answers = [] if answers is None else answers
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise Skip("malformed", f"answers must be a list of strings, got {answers!r}"[:200])
        data, ext, _ = checked_image(self.image(record.get("image"), item["base"]), self.decode_check)
        meta = {
            "source": "docvqa",
            "questionId": record.get("questionId"),
            "docId": record.get("docId"),
            "question": question,
        }
        if record.get("question_types") is not None:
            meta["question_types"] = record["question_types"]
        return {
            "image": data,
            "image_ext": ext,
            "task": "docvqa",
            "prompt": self.prompt.replace("{question}", question.strip()),
            "answers": answers,
            "meta": meta,
        }


def _question_order(record: dict) -> tuple:
    qid = record["questionId"]
    return (0, int(qid), "") if str(qid).isdigit() else (1, 0, str(qid))


def _json_part(path: Path, skips: list) -> tuple[int, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise ValueError(f"cannot read the DocVQA file {path}: {error}") from error
    records = data.get("data") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise ValueError(f"{path} is not a DocVQA release file (no 'data' list)")
    good = []
    for position, record in enumerate(records):
        if (
            isinstance(record, dict)
            and isinstance(record.get("questionId"), int | str)
            and record["questionId"] != ""
        ):
            good.append(record)
        else:
            skips.append(("malformed", f"{path.name}-record-{position}", f"no questionId: {record!r}"[:200]))
    good.sort(key=_question_order)
    items = [{"record": r, "base": str(path.parent)} for r in good]
    return len(items), lambda start: iter(items[start:])


def _parquet_part(path: Path) -> tuple[int, object]:
    def read(start: int):
        for row in iter_parquet(path, start, PARQUET_COLUMNS):
            yield {"record": row, "base": str(path.parent)}

    return parquet_rows(path), read


def docvqa_split(name: str, inputs: str | Path | list) -> Split:
    paths = expand_paths(inputs, (".json", ".parquet"))
    skips: list[tuple[str, str, str]] = []
    parts = []
    for path in paths:
        if path.suffix == ".parquet":
            parts.append(_parquet_part(path))
        elif path.suffix == ".json":
            parts.append(_json_part(path, skips))
        else:
            raise ValueError(f"{path}: DocVQA inputs are .json (original release) or .parquet (HF) files")

    def key(index: int, item: dict) -> str:
        qid = item["record"].get("questionId")
        return f"docvqa-{safe_key(qid)}" if qid not in (None, "") else f"docvqa-item{index}"

    return Split(
        name=name,
        inputs=[str(p.resolve()) for p in paths],
        total=sum(count for count, _ in parts),
        read=concat_reads(parts),
        key=key,
        listing_skips=skips,
    )


def prepare_docvqa(
    out: str | Path,
    splits: dict[str, str | Path | list],
    images_root: str | Path | None = None,
    prompt: str = DEFAULT_PROMPT,
    decode_check: bool = True,
    **write_kwargs,
) -> dict:
    """DocVQA -> shards under `out`; returns index.json's content.

    `splits` = {name: a .json / .parquet path, glob, folder or list of them}; `prompt` may use
    `{question}`. `write_kwargs` go to `vlm.data.prepare.write_dataset`.
    """
    from vlm.data.prepare import write_dataset

    check_prompt(prompt)
    converter = DocVQAConverter(prompt, str(images_root) if images_root else None, decode_check)
    plans = [docvqa_split(name, inputs) for name, inputs in splits.items()]
    return write_dataset(out, "docvqa", plans, converter, asdict(converter), **write_kwargs)


def add_arguments(parser) -> None:
    add_split_argument(
        parser,
        "NAME=PATH",
        "a split from .json / .parquet files: a path, a quoted glob, a folder or a comma-separated list (repeatable)",
    )
    parser.add_argument(
        "--images-root", type=Path, help="where the JSON's `image` paths are found if not next to the JSON"
    )
    parser.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        help="the prompt, with one <image> and {question} (default %(default)r)",
    )
    parser.add_argument(
        "--no-decode-check", action="store_true", help="check images with Pillow's verify() only"
    )


def run(args) -> dict:
    from vlm.data.sources import parse_split_specs

    return prepare_docvqa(
        splits=parse_split_specs(args.split),
        images_root=args.images_root,
        prompt=args.prompt,
        decode_check=not args.no_decode_check,
        **common_kwargs(args),
    )
