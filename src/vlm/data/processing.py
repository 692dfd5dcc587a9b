"""Samples -> model inputs: image views, prompt with `<image>` placeholders, token ids, labels, batches."""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from itertools import accumulate, chain
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, ImageOps

from vlm import IGNORE_INDEX, IMAGE_TOKEN
from vlm.contracts import CONTEXTS, IN_PROMPT, Batch, ImagePreprocessing, TiledViews
from vlm.data.images import ImageTooLarge, open_image, to_rgb
from vlm.data.skips import Skip

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff")
MAX_JSON_DEPTH = 100  # records nest a few levels; the json module recurses per level (and can crash)
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# \ud800..\udfff escaped, or encoded (from a str): a surrogate pair, or a lone surrogate
SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def image_members(raw: dict) -> list[tuple[str, bytes]]:
    """A raw sample's images in order, as (member extension, bytes): its pages `<key>.0.png`,
    `<key>.1.png`, ... by index, or else its plain `<key>.<ext>` members (IMAGE_EXTENSIONS order; see
    `vlm.data.shards`). Pages together with a plain image, or page numbers that are not 0..n-1, make
    a `malformed_record`."""
    plain = [(ext, raw[ext]) for ext in IMAGE_EXTENSIONS if ext in raw]
    pages: dict[int, tuple[str, bytes]] = {}
    for name, data in raw.items():
        index, dot, ext = name.partition(".")
        if dot and index.isdigit() and ext in IMAGE_EXTENSIONS:
            pages[int(index)] = (name, data)
    if not pages:
        return plain
    key = raw.get("__key__", "?")
    if plain:
        raise Skip("malformed_record", f"pages {sorted(pages)} and a plain .{plain[0][0]} image", key=key)
    if sorted(pages) != list(range(len(pages))):
        raise Skip("malformed_record", f"pages must be numbered 0..n-1, got {sorted(pages)}", key=key)
    return [pages[i] for i in range(len(pages))]


def load_record(data: bytes | str, key: str) -> dict:
    """A sample's `.json` member -> its record (a dict), or Skip: `malformed_json` when it does not
    parse, `malformed_record` when it is not an object or nests deeper than `MAX_JSON_DEPTH`,
    `invalid_unicode` when a string holds a lone surrogate."""
    if not isinstance(data, bytes | str):
        raise Skip("malformed_json", f"the .json member is a {type(data).__name__}", key=key)
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    # as many opening brackets as the limit cannot nest deeper: only longer lists are scanned
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and (depth := json_depth(raw)) > MAX_JSON_DEPTH:
        raise Skip("malformed_record", f"nested {depth} deep, over {MAX_JSON_DEPTH}", key=key)
    try:
        record = json.loads(data)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Skip("malformed_json", f"{type(error).__name__}: {error}", key=key) from error
    if not isinstance(record, dict):
        raise Skip("malformed_record", f"the record is a {type(record).__name__}, not an object", key=key)
    if (b"\\u" in raw or b"\xed" in raw) and SURROGATE.search(raw):  # finds first: the regex is slower
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as error:
            raise Skip("invalid_unicode", f"a lone surrogate: {error}", key=key) from error
    return record


def json_depth(raw: bytes) -> int:
    """How deep JSON text nests (brackets outside strings), without parsing it."""
    brackets = JSON_STRING.sub(b"", raw).translate(None, NOT_BRACKETS)
    steps = np.frombuffer(brackets, dtype=np.uint8)
    opens = (steps == ord("[")) | (steps == ord("{"))
    return int(np.cumsum(np.where(opens, 1, -1)).max(initial=0))


class SkipCounter:
    """Bad samples seen by this process since the last drain, by reason.

    Each dataloader worker has its own copy; counts ride along with the next good sample to the main
    process, where the training module adds them up. The first few of each reason are logged as
    warnings, the rest only counted (at debug level), so a badly broken dataset cannot flood the log.
    """

    counts: ClassVar[Counter] = Counter()
    warned: ClassVar[Counter] = Counter()
    max_warnings: ClassVar[int] = 10

    @classmethod
    def add(cls, error: Skip) -> None:
        cls.counts[error.reason] += 1
        cls.warned[error.reason] += 1
        if cls.warned[error.reason] <= cls.max_warnings:
            more = (
                " (further ones are counted without a warning)"
                if cls.warned[error.reason] == cls.max_warnings
                else ""
            )
            log.warning("skipped %s%s", error, more)
        else:
            log.debug("skipped %s", error)

    @classmethod
    def drain(cls) -> dict[str, int]:
        counts, cls.counts = dict(cls.counts), Counter()
        return counts


class ImageProcessor:
    """PIL image -> normalised (3, H, W) tensor as the encoder expects it; with tiling, `TiledViews`."""

    def __init__(self, preprocessing: ImagePreprocessing) -> None:
        self.prep = preprocessing
        self.mean = torch.tensor(preprocessing.mean).view(3, 1, 1)
        self.std = torch.tensor(preprocessing.std).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor | TiledViews:
        height, width = self.prep.size
        image = to_rgb(image)
        if self.prep.resize == "pad":
            # as DeepSeek-OCR's processor: fit inside, centre on the pad colour
            view = ImageOps.pad(image, (width, height), Image.Resampling.BICUBIC, self.prep.pad_color)
        else:
            view = image.resize((width, height), Image.Resampling.BICUBIC)
        if self.prep.tiling is None:
            return self.normalise(view)
        return TiledViews(self.normalise(view)[None], *self.tiles(image))

    def tiles(self, image: Image.Image) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The image resized to the chosen grid of tiles and cut row by row -> (rows*cols, 3, t, t)."""
        tile = self.prep.tiling.tile_size
        rows, cols = self.prep.tiling.choose_grid(image.width, image.height)
        if rows * cols == 0:
            return torch.zeros(0, 3, tile, tile), [(0, 0)]
        resized = image.resize((cols * tile, rows * tile), Image.Resampling.BICUBIC)
        tiles = [
            self.normalise(resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)))
            for r in range(rows)
            for c in range(cols)
        ]
        return torch.stack(tiles), [(rows, cols)]

    def normalise(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> contiguous float (3, H, W), normalised (contiguous: batching is then a copy)."""
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) view of HWC bytes
        x = pixels.to(torch.float32, memory_format=torch.contiguous_format)  # one copy, contiguous
        return x.div_(255.0).sub_(self.mean).div_(self.std)

    def empty(self) -> torch.Tensor | TiledViews:
        """What a sample without images carries."""
        views = torch.zeros(0, 3, *self.prep.size)
        if self.prep.tiling is None:
            return views
        tile = self.prep.tiling.tile_size
        return TiledViews(views, torch.zeros(0, 3, tile, tile), [])


def concat_views(views: list[torch.Tensor | TiledViews]) -> torch.Tensor | TiledViews:
    """Image tensors of several images or samples, concatenated (tiled views keep their tiles)."""
    return TiledViews.cat(views) if isinstance(views[0], TiledViews) else torch.cat(views)


def context_texts(record: dict, key: str) -> list[str]:
    """The texts a sample's images show, one per `<image>`: its record's `context_text` (a string for its
    one image, a list of strings for several, e.g. the pages of a document; an empty list: no image),
    else an OCR sample's first answer."""
    text = record.get("context_text")
    if text is None and record.get("task") == "ocr":
        text = record["answers"][0]
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError(
            f"sample {key!r} (task {record.get('task')!r}) has no context text for a text context arm: "
            f"give its record a context_text string (OCR samples use their answer), or a list of strings "
            f"(one per {IMAGE_TOKEN})"
        )
    return texts


class SampleProcessor:
    """Raw webdataset sample -> {key, prompt_ids, answer_ids, pixel_values, answers, task}.

    `prompt_ids` is `bos, prompt` with each `<image>` expanded to its vision tokens, `answer_ids` the
    answer's ids and eos (lists of ints); `Collator` makes the batch's tensors from them, so a sample
    costs no tensors of its own but its images.

    A text `context` arm (`vlm.models.context`) reads no images: each `<image>` of the prompt stands for
    the text that image shows (`context_texts`: one string for a one-image prompt, a list of one string
    per `<image>` for several), as K placeholders with the text's ids (`text_meanpool`, `text_conv`:
    `context_ids` holds every image's text ids one after another, `context_lengths` how many each) or as
    token ids in the placeholders' place (`truncate`: the first K, padded to K; `full_text`: all).
    """

    prompt_cache_size: ClassVar[int] = 1024  # datasets mostly repeat a few prompts (DocVQA: questions)

    def __init__(
        self,
        tokenizer,
        image_preprocessing: ImagePreprocessing,
        vision_tokens_per_image: int,
        max_length: int = 512,
        train: bool = True,
        context: str = "vision",
    ) -> None:
        if context not in CONTEXTS:
            raise ValueError(f"context={context!r}: expected one of {', '.join(CONTEXTS)}")
        self.context = context
        self.tokenizer = tokenizer
        self.images = ImageProcessor(image_preprocessing)
        self.vision_tokens_per_image = vision_tokens_per_image
        self.max_length = max_length
        self.train = train
        self._prompts: dict[tuple, tuple[int, ...]] = {}

    @classmethod
    def for_model(cls, model, max_length: int = 512, train: bool = True) -> SampleProcessor:
        """The processor of a `VisionLanguageModel`: its tokenizer, image preprocessing, vision tokens per
        image and context arm."""
        return cls(
            model.tokenizer,
            model.encoder.preprocessing,
            model.vision_tokens_per_image,
            max_length,
            train=train,
            context=model.context,
        )

    def decode(self, raw: dict) -> tuple[dict, list[Image.Image]]:
        key = raw.get("__key__", "?")
        record = self.read_record(raw)
        images = []
        for name, data in image_members(raw):
            try:
                image = open_image(data, max_pixels=None)  # the reader checked data.max_image_pixels
                image.load()
            except ImageTooLarge as error:
                raise Skip("image_too_large", f"{name}: {error}", key=key) from error
            except Exception as error:
                raise Skip("corrupt_image", f"{name}: {type(error).__name__}: {error}", key=key) from error
            images.append(image)
        markers = record["prompt"].count(IMAGE_TOKEN)
        if markers > len(images):
            raise Skip(
                "missing_image",
                f"the prompt has {markers} {IMAGE_TOKEN} marker(s), the sample {len(images)} image(s)",
                key=key,
            )
        return record, images

    def read_record(self, raw: dict) -> dict:
        """The sample's record with its prompt and answers checked (empty answers dropped)."""
        key = raw.get("__key__", "?")
        if "json" not in raw:
            raise Skip("malformed_record", f"no .json member (members: {sorted(raw)})", key=key)
        record = load_record(raw["json"], key)
        try:
            answers = record["answers"]
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"answers must be a non-empty list of strings, got {answers!r}")
            if record["prompt"] is None:
                raise ValueError("prompt is null")
            record["prompt"] = str(record["prompt"])
        except (KeyError, ValueError, TypeError) as error:
            raise Skip("malformed_record", f"{type(error).__name__}: {error}", key=key) from error
        record["answers"] = [a for a in answers if a.strip()]
        if not record["answers"]:
            raise Skip("empty_text", f"every answer is empty: {answers!r}", key=key)
        return record

    def encode_prompt(self, prompt: str, num_images: int, placeholders: list[int] | None = None) -> list[int]:
        """bos (when the tokenizer has one; Qwen2.5's has none) + prompt ids, the i-th `<image>`
        expanded into `placeholders[i]` image tokens (default: `vision_tokens_per_image` each)."""
        if num_images and IMAGE_TOKEN not in prompt:
            prompt = IMAGE_TOKEN * num_images + "\n" + prompt
        pieces = self.tokenizer.format_prompt(prompt).split(IMAGE_TOKEN)
        if len(pieces) - 1 != num_images:
            raise ValueError(f"prompt has {len(pieces) - 1} {IMAGE_TOKEN} markers for {num_images} image(s)")
        placeholders = placeholders or [self.vision_tokens_per_image] * num_images
        ids = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        for i, piece in enumerate(pieces):
            if i:
                ids += [self.tokenizer.image_token_id] * placeholders[i - 1]
            ids += self.tokenizer.encode(piece)
        return ids

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor | TiledViews:
        """A sample's images processed for the encoder, stacked (tiled views keep their tiles)."""
        if not images:
            return self.images.empty()
        views = [self.images(image) for image in images]
        if isinstance(views[0], TiledViews):
            return concat_views(views)
        return views[0][None] if len(views) == 1 else torch.stack(views)  # one image: a view, no copy

    def placeholders(self, views: torch.Tensor | TiledViews) -> list[int]:
        """Image tokens for each processed image: tiles add theirs to the untiled count."""
        if not isinstance(views, TiledViews):
            return [self.vision_tokens_per_image] * len(views)
        tiling = self.images.prep.tiling
        return [self.vision_tokens_per_image + tiling.local_positions(grid) for grid in views.tile_grids]

    def prompt_ids(self, prompt: str, num_images: int, placeholders: list[int]) -> tuple[int, ...]:
        """`encode_prompt`, remembered per (prompt, placeholders): the same text gives the same ids."""
        key = (prompt, num_images, *placeholders)
        ids = self._prompts.get(key)
        if ids is None:
            ids = tuple(self.encode_prompt(prompt, num_images, placeholders))
            if len(self._prompts) >= self.prompt_cache_size:
                self._prompts.clear()
            self._prompts[key] = ids
        return ids

    def text_context(self, record: dict, key: str) -> tuple[tuple[int, ...], dict]:
        """(prompt ids, extra sample fields) of a text context arm: each `<image>` of the prompt holds the
        text that image shows (`context_texts`, in prompt order), as K placeholders with `context_ids` and
        `context_lengths`, or as ids. A single string fills a prompt's one `<image>` (put first when the
        prompt has none); a count of texts other than the prompt's `<image>`s is a `malformed_record`."""
        texts = context_texts(record, key)
        markers = record["prompt"].count(IMAGE_TOKEN)
        if markers != len(texts) and not (len(texts) == 1 and markers == 0):
            raise Skip(
                "malformed_record",
                f"context={self.context}: {len(texts)} context text(s) for {markers} {IMAGE_TOKEN} "
                f"marker(s) in the prompt",
                key=key,
            )
        rows = [self.tokenizer.encode(text) for text in texts]
        empty = [i for i, row in enumerate(rows) if not row]
        if empty:
            which = "the context text is empty" if len(rows) == 1 else f"the context texts {empty} are empty"
            raise Skip("empty_text", which, key=key)
        if self.context not in IN_PROMPT:
            prompt_ids = self.prompt_ids(
                record["prompt"], len(rows), [self.vision_tokens_per_image] * len(rows)
            )
            fields = {
                "context_ids": list(chain.from_iterable(rows)),
                "context_lengths": [len(r) for r in rows],
            }
            return prompt_ids, fields if rows else {}
        if self.context == "truncate":  # exactly K positions each: cut, or padded when the text is shorter
            K = self.vision_tokens_per_image
            rows = [row[:K] + [self.tokenizer.pad_id] * (K - len(row)) for row in rows]
        ids = list(self.prompt_ids(record["prompt"], len(rows), [len(row) for row in rows]))
        # the placeholders, image after image, take the texts' ids in the same order (text never encodes
        # to the image token, so every image token id is a placeholder)
        slots = [i for i, token in enumerate(ids) if token == self.tokenizer.image_token_id]
        for slot, token in zip(slots, chain.from_iterable(rows), strict=True):
            ids[slot] = token
        return tuple(ids), {}

    def __call__(self, raw: dict) -> dict:
        key = raw.get("__key__", "?")
        context = {}
        if self.context == "vision":
            record, images = self.decode(raw)
            pixel_values = self.pixel_values(images)
            try:
                prompt_ids = self.prompt_ids(record["prompt"], len(images), self.placeholders(pixel_values))
            except ValueError as error:
                raise Skip("malformed_record", str(error), key=key) from error
        else:
            record, pixel_values = self.read_record(raw), self.images.empty()
            prompt_ids, context = self.text_context(record, key)
        answer = random.choice(record["answers"]) if self.train else record["answers"][0]
        answer_ids = [*self.tokenizer.encode(answer), self.tokenizer.eos_id]
        if len(prompt_ids) + len(answer_ids) > self.max_length:
            raise Skip("too_long", f"{len(prompt_ids) + len(answer_ids)} > {self.max_length} tokens", key=key)
        return {
            "key": key,
            "prompt_ids": prompt_ids,
            "answer_ids": answer_ids,
            "pixel_values": pixel_values,
            "answers": record["answers"],
            "task": record.get("task", ""),
        } | context


def padded(rows: list[Sequence[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids, mask), (len(rows), longest) int64, padded on the right (or left) with
    `value`; one conversion of all the ids, the padding by a mask."""
    lengths = torch.tensor([len(row) for row in rows])
    positions = torch.arange(int(lengths.max()) if rows else 0)
    mask = positions >= positions.numel() - lengths[:, None] if left else positions < lengths[:, None]
    ids = torch.full(mask.shape, value, dtype=torch.long)
    ids[mask] = torch.tensor(list(chain.from_iterable(rows)), dtype=torch.long)
    return ids, mask.long()


def to_device(batch: Batch, device) -> Batch:
    """A collated batch's tensors (and tiled views) on `device`; lists and counts stay as they are."""
    return {name: value.to(device) if hasattr(value, "to") else value for name, value in batch.items()}


class Collator:
    """Samples of `SampleProcessor` -> training tensors (right-padded `input_ids`, `labels` IGNORE_INDEX
    but on answer and eos, `attention_mask`), the left-padded prompts for generation, the images.

    When every sample with images also gives each image's text as token ids (`image_text_ids`, e.g. the
    pages of a `vlm.data.longdoc` sample), the batch has `image_text_ids`: one id tensor per image of
    `pixel_values`, in the same order (what per-image reading losses need). Samples of a compressed
    text context arm give their texts' ids, batched as one right-padded row per `<image>` (`context_ids`,
    `context_mask`; see `context_texts`)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, samples: list[dict]) -> Batch:
        skipped = SkipCounter.drain()
        prompts = [s["prompt_ids"] for s in samples]
        input_ids, attention_mask = padded(
            [(*s["prompt_ids"], *s["answer_ids"]) for s in samples], self.pad_id
        )
        prompt_lengths = torch.tensor([len(p) for p in prompts])
        in_prompt = torch.arange(input_ids.shape[1]) < prompt_lengths[:, None]
        labels = input_ids.masked_fill(in_prompt | ~attention_mask.bool(), IGNORE_INDEX)
        prompt_ids, prompt_mask = padded(prompts, self.pad_id, left=True)
        texts = self.image_texts(samples) | self.context_texts(samples)
        return {
            "keys": [s["key"] for s in samples],
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "pixel_values": concat_views([s["pixel_values"] for s in samples]),
            "images_per_sample": torch.tensor([len(s["pixel_values"]) for s in samples]),
            "answers": [s["answers"] for s in samples],
            "skipped": skipped,
        } | texts

    def context_texts(self, samples: list[dict]) -> dict:
        """One right-padded row per `<image>` of a compressed text arm, in the order of the placeholders
        (sample after sample, image after image, as `pixel_values` holds images)."""
        lengths = [s.get("context_lengths", ()) for s in samples]
        if not any(lengths):
            return {}
        rows = []
        for sample, sizes in zip(samples, lengths, strict=True):
            ends = list(accumulate(sizes))
            rows += [sample["context_ids"][end - size : end] for end, size in zip(ends, sizes, strict=True)]
        context_ids, context_mask = padded(rows, self.pad_id)
        return {"context_ids": context_ids, "context_mask": context_mask}

    @staticmethod
    def image_texts(samples: list[dict]) -> dict:
        texts = [s.get("image_text_ids") for s in samples if len(s["pixel_values"])]
        if not texts or any(t is None for t in texts):
            return {}
        return {"image_text_ids": [torch.tensor(ids, dtype=torch.long) for t in texts for ids in t]}


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `capacity` tokens, first fit in decreasing
    order of length (each row's indices in the order they were placed); a length over `capacity` is an
    error naming it."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"sample {index} has {length} tokens, more than a packed row's {capacity}")
        row = next((r for r, room in enumerate(free) if room >= length), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= length
    return rows


class PackingCollator(Collator):
    """`Collator`, with the batch's samples packed into as few rows of at most `max_length` tokens as
    fit (`pack`; `data.packing`): the same samples and answer tokens, less padding. Each row's samples
    are told apart by `segment_ids` (B_rows, T): 1, 2, ... per sample in the row, 0 on padding; the model
    restarts positions at each sample and lets no sample attend to another
    (`VisionLanguageModel.forward`). Everything per sample (keys, prompts for generation, images in the
    placeholders' order, their texts) comes as `Collator` gives it, in the packed order, and each sample's
    own row of labels as `sample_labels` (what the OCR reading losses read)."""

    def __init__(self, pad_id: int, max_length: int) -> None:
        super().__init__(pad_id)
        self.max_length = max_length

    def __call__(self, samples: list[dict]) -> Batch:
        lengths = [len(s["prompt_ids"]) + len(s["answer_ids"]) for s in samples]
        rows = pack(lengths, self.max_length)
        order = [index for row in rows for index in row]
        samples = [samples[index] for index in order]
        batch = super().__call__(samples)
        sequences, segments, answers, first = [], [], [], 0
        for row in rows:
            members = samples[first : first + len(row)]
            first += len(row)
            sequences.append([t for s in members for t in (*s["prompt_ids"], *s["answer_ids"])])
            segments.append(
                [
                    n
                    for n, s in enumerate(members, 1)
                    for _ in range(len(s["prompt_ids"]) + len(s["answer_ids"]))
                ]
            )
            answers.append(
                [a for s in members for a in ([0] * len(s["prompt_ids"]) + [1] * len(s["answer_ids"]))]
            )
        input_ids, attention_mask = padded(sequences, self.pad_id)
        segment_ids, _ = padded(segments, 0)
        is_answer, _ = padded(answers, 0)
        batch["sample_labels"] = batch["labels"]
        batch["input_ids"], batch["attention_mask"], batch["segment_ids"] = (
            input_ids,
            attention_mask,
            segment_ids,
        )
        batch["labels"] = input_ids.masked_fill(~is_answer.bool(), IGNORE_INDEX)
        return batch
