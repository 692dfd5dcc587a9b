"""Loader speed: the streaming pipeline's samples/s per worker against decoding and resizing alone.

    python -m vlm.bench data [--samples 2000] [hydra overrides, e.g. data=coco encoder=siglip sizes=tiny]

The pipeline is what training reads: `data`'s training dataloader with one process (`num_workers=0`,
so the rate is per worker): shard reading, shuffle buffer, mixing, JSON, image decode + resize +
normalise, tokenisation, batching. The raw rate decodes, resizes and normalises the same images straight
from the same tar files, nothing else. Overhead = raw rate / pipeline rate - 1; the target is <= 25%.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tarfile
import time
from itertools import cycle, islice

import torch
from hydra.utils import instantiate
from PIL import Image

from vlm.config import compose
from vlm.data.datamodule import is_local
from vlm.data.processing import IMAGE_EXTENSIONS, ImageProcessor
from vlm.training.run import build_datamodule


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=2000, help="samples to time in each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one worker's share)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config")


def raw_images(urls: list[str], limit: int):
    """The first `limit` image members of the (local) shards, as bytes."""
    found = 0
    for url in urls:
        if not is_local(url):
            raise ValueError(f"the raw rate reads local shards only, got {url}")
        with tarfile.open(url.removeprefix("file://")) as tar:
            for member in tar:
                if member.name.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
                    yield tar.extractfile(member).read()
                    found += 1
                    if found == limit:
                        return


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
    urls = datamodule.shards("train")
    wanted = batches * cfg.data.batch_size
    encoded = list(islice(cycle(list(raw_images(urls, wanted))), wanted))  # the shards may hold fewer

    def pipeline_pass() -> float:
        start = time.perf_counter()
        samples = sum(len(batch["keys"]) for batch in islice(batches_iter, batches))
        return samples / (time.perf_counter() - start)

    def raw_pass() -> float:
        start = time.perf_counter()
        for data in encoded:
            images(Image.open(io.BytesIO(data)))
        return len(encoded) / (time.perf_counter() - start)

    rates: dict[str, list[float]] = {"pipeline": [], "raw": []}
    for _ in range(args.repeats):  # alternating, so drifts in the machine's speed hit both
        rates["pipeline"].append(pipeline_pass())
        rates["raw"].append(raw_pass())
    pipeline, raw = (statistics.median(rates[name]) for name in ("pipeline", "raw"))
    samples = wanted
    print(
        f"data={cfg.data.get('name') or 'synthetic'}: {samples} samples, batch {cfg.data.batch_size}, "
        f"image {model.encoder.preprocessing.size}, {torch.get_num_threads()} thread(s)\n"
        f"pipeline (1 worker):       {pipeline:8.0f} samples/s\n"
        f"raw decode + resize:       {raw:8.0f} samples/s (the same images, read before timing)\n"
        f"(medians of {args.repeats} alternating passes: pipeline "
        f"{', '.join(f'{r:.0f}' for r in rates['pipeline'])}; raw {', '.join(f'{r:.0f}' for r in rates['raw'])})\n"
        f"pipeline overhead: {raw / pipeline - 1:+.0%} (target <= +25%)"
    )
