"""Loader speed: the streaming pipeline's samples/s per worker against decoding and resizing alone.

    python -m vlm.app.bench data [--samples 2000] [hydra overrides, e.g. data=coco encoder=siglip sizes=tiny]

The pipeline is what training reads: `data`'s training dataloader with one process (`num_workers=0`,
so the rate is per worker): shard reading, shuffle buffer, mixing, JSON, image decode + resize +
normalise, tokenisation, batching. The raw rate decodes, resizes and normalises the images of the very
samples the pipeline pass before it delivered, read from the same tar files before timing, nothing
else. Both are reported per second of wall clock and of this process's CPU time (what one worker
spends: on a shared machine the wall clock also counts other jobs). Overhead = raw rate / pipeline
rate - 1; the target is <= 25%.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from itertools import islice

import torch
from hydra.utils import instantiate
from PIL import Image

from vlm.config import compose
from vlm.data.processing import IMAGE_EXTENSIONS, ImageProcessor
from vlm.data.tar_reading import is_local, read_shard
from vlm.training.builders import build_datamodule


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=2000, help="samples to time in each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one worker's share)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config")


class EncodedImages:
    """The encoded images of training samples by key, read from the (local) shards outside the timing,
    a shard at a time until every key asked for is found."""

    def __init__(self, urls: list[str]) -> None:
        self.unread = list(urls)
        self.found: dict[str, list[bytes]] = {}

    def __call__(self, keys: list[str]) -> list[list[bytes]]:
        missing = set(keys) - self.found.keys()
        while missing and self.unread:
            url = self.unread.pop(0)
            if not is_local(url):
                raise ValueError(f"the raw rate reads local shards only, got {url}")
            for raw in read_shard(url, quiet=True):
                self.found[raw["__key__"]] = [raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw]
                missing.discard(raw["__key__"])
        if missing:
            raise KeyError(f"{len(missing)} sample(s) not in the training shards, e.g. {min(missing)}")
        return [self.found[key] for key in keys]


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def rates_since(start: tuple[float, float], samples: int) -> tuple[float, float]:
    """Samples per second of wall clock and of this process's CPU time since `start`."""
    return tuple(samples / (now - then) for now, then in zip(clocks(), start, strict=True))


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    cfg = compose("train", ["hydra.run.dir=.", "data.num_workers=0", *args.overrides])
    model = instantiate(cfg.model)
    datamodule = build_datamodule(cfg.data, model, cfg.max_length)
    datamodule.prepare_data()
    loader = datamodule.train_dataloader()
    batches = -(-args.samples // cfg.data.batch_size)

    def stream():  # epoch after epoch (an epoch may be shorter than the run)
        while True:
            yield from loader

    batches_iter = stream()
    next(batches_iter)  # warm-up: open the stream, fill the shuffle buffer once
    images = ImageProcessor(model.encoder.preprocessing)
    encoded = EncodedImages(datamodule.shards("train"))

    def pipeline_pass() -> tuple[tuple[float, float], list[str]]:
        keys: list[str] = []
        start = clocks()
        for batch in islice(batches_iter, batches):
            keys += batch["keys"]
        return rates_since(start, len(keys)), keys

    def raw_pass(samples: list[list[bytes]]) -> tuple[float, float]:
        start = clocks()
        for sample in samples:
            for data in sample:
                images(Image.open(io.BytesIO(data)))
        return rates_since(start, len(samples))

    rates: dict[str, list[tuple[float, float]]] = {"pipeline": [], "raw": []}
    for _ in range(args.repeats):  # alternating, so drifts in the machine's speed hit both
        rate, keys = pipeline_pass()
        rates["pipeline"].append(rate)
        rates["raw"].append(raw_pass(encoded(keys)))  # the same samples' images
    median = {(name, c): statistics.median(r[c] for r in rates[name]) for name in rates for c in (0, 1)}
    overhead = [median["raw", c] / median["pipeline", c] - 1 for c in (0, 1)]

    def passes(c: int) -> str:
        return "; ".join(f"{name} {', '.join(f'{r[c]:.0f}' for r in rates[name])}" for name in rates)

    print(
        f"data={cfg.data.get('name') or 'synthetic'}: {len(keys)} samples a pass, batch {cfg.data.batch_size}, "
        f"image {model.encoder.preprocessing.size}, {torch.get_num_threads()} thread(s)\n"
        f"                            wall clock   CPU time (samples/s)\n"
        f"pipeline (1 worker):       {median['pipeline', 0]:8.0f}   {median['pipeline', 1]:8.0f}\n"
        f"raw decode + resize:       {median['raw', 0]:8.0f}   {median['raw', 1]:8.0f}"
        f"   (the images of the same samples, read before timing)\n"
        f"medians of {args.repeats} alternating passes; wall clock: {passes(0)}; CPU time: {passes(1)}\n"
        f"pipeline overhead: {overhead[0]:+.0%} wall clock, {overhead[1]:+.0%} CPU time (target <= +25%)"
    )
