"""COCO captions -> one sample per image with all its captions (task `caption`).

The official download:
    <root>/annotations/captions_train2017.json   {images: [{id, file_name, ...}],
    <root>/annotations/captions_val2017.json      annotations: [{id, image_id, caption}]}
    <root>/train2017/000000000009.jpg ...
    <root>/val2017/000000000139.jpg ...

    python -m vlm.app.prepare coco --root /data/coco --out data/coco
    python -m vlm.app.prepare coco --out data/coco \\
        --split train=/data/coco/annotations/captions_train2017.json:/data/coco/train2017 \\
        --split val=/data/coco/annotations/captions_val2017.json:/data/coco/val2017

`--root` makes a split of every annotations/captions_<name>.json whose image folder <root>/<name>
exists, named without the year (train2017 -> train, val2017 -> val). `--split NAME=JSON:IMAGE_DIR`
names them yourself (repeatable).

A sample: key `coco-<image id, 12 digits>`, the JPEG bytes as they are (checked with Pillow), prompt
"<image>\\nDescribe the image.", answers = all the image's captions, stripped, in annotation-id order
(training draws one per step, evaluation keeps all), meta {source, image_id, file_name}. Items are the
images sorted by id. Skipped (counted in index.json): missing_image, not_a_file (a pipe, device or
folder), outside_root (a file_name that leads out of the image folder: `..`, an absolute path, a
symlink to elsewhere), corrupt_image, image_too_large, no_captions (an image without captions),
malformed (an image or caption record without the fields above, a caption that is not a string).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from vlm.data.sources import (
    Skip,
    Split,
    add_split_argument,
    check_prompt,
    checked_image,
    common_kwargs,
    path_under,
    read_file,
    split_path_dir,
)

DEFAULT_PROMPT = "<image>\nDescribe the image."


@dataclass
class CocoConverter:
    prompt: str = DEFAULT_PROMPT
    decode_check: bool = True

    def __call__(self, key: str, item: dict) -> dict:
        if not item["captions"]:
            raise Skip("no_captions", item["file_name"])
        path = path_under(item["folder"], item["file_name"])
        data, ext, _ = checked_image(read_file(path), self.decode_check)
        return {
            "image": data,
            "image_ext": ext,
            "task": "caption",
            "prompt": self.prompt,
            "answers": item["captions"],
            "meta": {"source": "coco", "image_id": item["image_id"], "file_name": item["file_name"]},
        }


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def coco_split(name: str, annotations: str | Path, images: str | Path) -> Split:
    """The images of one captions file, sorted by id, each with its captions."""
    annotations, images = Path(annotations), Path(images)
    try:
        data = json.loads(annotations.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise ValueError(f"cannot read the COCO captions file {annotations}: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{annotations} is not a COCO captions file (no 'images' list)")
    if not images.is_dir():
        raise FileNotFoundError(f"no image folder {images}")
    skips: list[tuple[str, str, str]] = []
    records: dict[int, dict] = {}
    for position, image in enumerate(data["images"]):
        if (
            not isinstance(image, dict)
            or not _is_id(image.get("id"))
            or not isinstance(image.get("file_name"), str)
        ):
            skips.append(
                (
                    "malformed",
                    f"image-record-{position}",
                    f"image record without id/file_name: {image!r}"[:200],
                )
            )
            continue
        records.setdefault(image["id"], image)
    captions: dict[int, list[tuple[float, int, str]]] = {}
    for position, ann in enumerate(data.get("annotations") or []):
        ok = isinstance(ann, dict) and _is_id(ann.get("image_id")) and isinstance(ann.get("caption"), str)
        if not ok or ann["image_id"] not in records:
            message = "caption of an unknown image" if ok else "caption record without image_id/caption"
            skips.append(("malformed", f"annotation-{position}", f"{message}: {ann!r}"[:200]))
            continue
        order = ann["id"] if _is_id(ann.get("id")) else float("inf")
        captions.setdefault(ann["image_id"], []).append((order, position, ann["caption"].strip()))
    items = [
        {
            "image_id": image_id,
            "file_name": records[image_id]["file_name"],
            "folder": str(images),
            "captions": [c for _, _, c in sorted(captions.get(image_id, [])) if c],
        }
        for image_id in sorted(records)
    ]
    return Split(
        name=name,
        inputs=[str(annotations.resolve()), str(images.resolve())],
        total=len(items),
        read=lambda start: iter(items[start:]),
        key=lambda index, item: f"coco-{item['image_id']:012d}",
        listing_skips=skips,
    )


def find_splits(root: str | Path) -> dict[str, tuple[Path, Path]]:
    """{split: (captions json, image folder)} of the official layout under `root`."""
    root = Path(root)
    splits = {}
    for captions_file in sorted((root / "annotations").glob("captions_*.json")):
        folder = captions_file.stem.removeprefix("captions_")
        if (root / folder).is_dir():
            splits[re.sub(r"\d{4}$", "", folder) or folder] = (captions_file, root / folder)
    if not splits:
        raise FileNotFoundError(
            f"no annotations/captions_<name>.json with an image folder <name> under {root}"
        )
    return splits


def prepare_coco(
    out: str | Path,
    splits: dict[str, tuple[str | Path, str | Path]] | None = None,
    root: str | Path | None = None,
    prompt: str = DEFAULT_PROMPT,
    decode_check: bool = True,
    **write_kwargs,
) -> dict:
    """COCO captions -> shards under `out`; returns index.json's content.

    `splits` = {name: (captions json, image folder)}, or `root` = the official download folder.
    `write_kwargs` go to `vlm.data.prepare.write_dataset` (samples_per_shard, prefix, workers, ...).
    """
    from vlm.data.prepare import write_dataset

    if splits is None:
        if root is None:
            raise ValueError(
                "give the splits ({name: (captions json, image folder)}) or the COCO root folder"
            )
        splits = find_splits(root)
    converter = CocoConverter(check_prompt(prompt), decode_check)
    plans = [coco_split(name, annotations, images) for name, (annotations, images) in splits.items()]
    return write_dataset(out, "coco", plans, converter, asdict(converter), **write_kwargs)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--root", type=Path, help="the COCO folder holding annotations/ and train2017/, val2017/"
    )
    add_split_argument(
        parser,
        "NAME=JSON:IMAGE_DIR",
        "a split from a captions file and its image folder (repeatable; instead of --root)",
        required=False,
    )
    parser.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="the prompt, with one <image> (default %(default)r)"
    )
    parser.add_argument(
        "--no-decode-check",
        action="store_true",
        help="check images with Pillow's verify() only (faster; truncated JPEGs then pass)",
    )


def run(args) -> dict:
    from vlm.data.sources import parse_split_specs

    splits = None
    if args.split:
        splits = {}
        for name, specs in parse_split_specs(args.split).items():
            if len(specs) != 1 or split_path_dir(specs[0])[1] is None:
                raise ValueError(f"--split {name}= wants one JSON:IMAGE_DIR, got {specs}")
            splits[name] = split_path_dir(specs[0])
    return prepare_coco(
        splits=splits,
        root=args.root,
        prompt=args.prompt,
        decode_check=not args.no_decode_check,
        **common_kwargs(args),
    )
