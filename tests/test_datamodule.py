"""Streaming real-data shards: mixing by weight, rank x worker splits, fixed epochs, bad data."""

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader

from tests.conftest import TINY_MODEL, run_cli
from vlm.contracts import ImagePreprocessing
from vlm.data.datamodule import ShardDataModule
from vlm.data.loading import DataReport, SourceCollator, StreamLoader
from vlm.data.processing import Collator, SampleProcessor, SkipCounter
from vlm.data.shards import write_index, write_shards
from vlm.data.stream import ShardStream, Source, TrainStream
from vlm.models.llms.tokenizer import ByteTokenizer

BAD_REASONS = ("corrupt_image", "missing_image", "malformed_json", "empty_text", "truncated_tar")


@pytest.fixture(autouse=True)
def fresh_skip_counts():
    """Counts left in this process by an earlier test would ride along with the next batch."""
    SkipCounter.drain()
    yield
    SkipCounter.drain()


def png(shade: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(buffer, format="PNG")
    return buffer.getvalue()


def samples(prefix: str, count: int, start: int = 0, image: bool = True) -> list[dict]:
    return [
        {
            "key": f"{prefix}-{i:05d}",
            "image": png(i % 256) if image else None,
            "image_ext": "png",
            "task": "ocr" if image else "text",
            "prompt": "<image>\nRead." if image else "",
            "answers": [f"text {i}"],
        }
        for i in range(start, start + count)
    ]


def uneven_shards(directory: Path, prefix: str, sizes: list[int]) -> list[str]:
    """One shard per size (`<prefix><n>-000000.tar`), keys numbered across them."""
    urls, start = [], 0
    for n, size in enumerate(sizes):
        urls += write_shards(samples(prefix, size, start), directory, f"{prefix}{n}", size)
        start += size
    return urls


def processor(train: bool = True) -> SampleProcessor:
    return SampleProcessor(
        ByteTokenizer(), ImagePreprocessing(size=(32, 32)), vision_tokens_per_image=4, train=train
    )


def loader(stream: ShardStream, batch_size: int) -> DataLoader:
    collate = SourceCollator(Collator(ByteTokenizer().pad_id), [s.name for s in stream.sources])
    return StreamLoader(stream, "train", DataReport(), batch_size=batch_size, collate_fn=collate)


def datamodule(**kwargs) -> ShardDataModule:
    return ShardDataModule(processor, ByteTokenizer().pad_id, **{"batch_size": 4, "seed": 0, **kwargs})


def as_rank(dm: ShardDataModule, rank: int, world: int) -> ShardDataModule:
    """The datamodule as rank `rank` of `world` sees it (the parts of a Trainer it reads)."""
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, global_step=0, current_epoch=0)
    return dm


# -- mixing -------------------------------------------------------------------------------------------
def test_mix_draws_sources_by_weight_and_reports_the_counts(tmp_path):
    sources = [
        Source("vision", uneven_shards(tmp_path, "vision", [10, 10, 10, 10]), 0.9),
        Source("text", write_shards(samples("text", 12, image=False), tmp_path, "text", 3), 0.1),
    ]

    def draw(rank: int = 0, seed: int = 0) -> list[dict]:
        stream = TrainStream(sources, processor(), rank=rank, world_size=2, seed=seed, shuffle_buffer=8, batch_size=20, batches_per_epoch=100)  # fmt: skip
        return list(loader(stream, 20))

    batches = draw()
    keys = [k for b in batches for k in b["keys"]]
    assert len(batches) == 100 and len(keys) == 2000
    text_share = sum(k.startswith("text") for k in keys) / len(keys)
    assert text_share == pytest.approx(0.1, abs=0.02)  # binomial sd at n=2000: 0.0067
    reported = sum((Counter(b["sources"]) for b in batches), Counter())
    assert reported == Counter(k.split("-")[0] for k in keys)
    assert all(
        b["images_per_sample"].tolist() == [int(k.startswith("vision")) for k in b["keys"]] for b in batches
    )
    assert keys == [k for b in draw() for k in b["keys"]]  # deterministic given the seed
    assert keys != [k for b in draw(rank=1) for k in b["keys"]]
    assert keys != [k for b in draw(seed=1) for k in b["keys"]]


def test_mix_config_validates_and_evaluates_on_the_first_source(tmp_path):
    uneven_shards(tmp_path / "a" / "train", "a", [4, 4])
    uneven_shards(tmp_path / "a" / "val", "aval", [3])
    uneven_shards(tmp_path / "b" / "train", "b", [4, 4])
    dm = datamodule(
        name="mix",
        sources=[
            {
                "name": "a",
                "weight": 3,
                "train_urls": f"{tmp_path}/a/train/*.tar",
                "val_urls": f"{tmp_path}/a/val/*.tar",
            },
            {"name": "b", "weight": 1, "train_urls": f"{tmp_path}/b/train/b{{0..1}}-000000.tar"},
        ],
    )
    assert [(s.name, len(s.urls), s.weight) for s in dm.train_sources()] == [("a", 2, 3.0), ("b", 2, 1.0)]
    batch = next(iter(dm.val_dataloader()))
    assert batch["sources"] == {"a": 3} and len(batch["keys"]) == 3
    missing = datamodule(sources=[{"name": "c", "weight": 1, "train_urls": f"{tmp_path}/c/*.tar"}])
    with pytest.raises(FileNotFoundError, match=r"data source 'c' \(train\).*vlm.app.prepare"):
        missing.train_dataloader()


# -- ranks, workers, epochs -----------------------------------------------------------------------------
def test_ranks_and_workers_split_an_epoch_into_equal_disjoint_parts(tmp_path):
    urls = uneven_shards(tmp_path, "s", [3, 4, 5, 6, 7, 8, 9, 10])  # 52 samples, 2 shards per reader

    def epoch(rank: int, epoch: int) -> list[list[str]]:
        stream = TrainStream(urls, processor(), rank=rank, world_size=2, seed=7, shuffle_buffer=4, batch_size=4, batches_per_epoch=5, epoch=epoch)  # fmt: skip
        assert len(stream) == 20
        return [
            b["keys"]
            for b in DataLoader(
                stream, batch_size=4, num_workers=2, collate_fn=lambda s: {"keys": [x["key"] for x in s]}
            )
        ]

    ranks = [epoch(rank, 0) for rank in range(2)]
    assert [len(batches) for batches in ranks] == [5, 5]  # whole batches only, the same on every rank
    assert all(len(keys) == 4 for batches in ranks for keys in batches)
    keys = [{k for batch in batches for k in batch} for batches in ranks]
    assert not keys[0] & keys[1]
    again = epoch(0, 0)
    assert again == ranks[0]  # deterministic
    later = epoch(0, 1)
    assert later != ranks[0] and len(later) == 5


def test_the_loader_advances_the_epoch(tmp_path):
    urls = uneven_shards(tmp_path, "s", [6, 6, 6, 6])
    stream = TrainStream(urls, processor(), seed=1, shuffle_buffer=4, batch_size=4, batches_per_epoch=3)
    train = loader(stream, 4)
    first, second = ([k for b in train for k in b["keys"]] for _ in range(2))
    assert stream.epoch == 1 and len(first) == len(second) == 12 and first != second


def test_epoch_length_comes_from_the_config_or_the_index(tmp_path):
    urls = uneven_shards(tmp_path / "train", "t", [5, 6, 7, 8])
    dm = datamodule(train_urls=f"{tmp_path}/train/*.tar")
    assert dm.epoch_batches(world=2) is None  # no index: endless, trainer.max_steps cuts the run
    write_index(
        tmp_path, {"splits": {"train": {"samples": 26, "shards": [f"train/{Path(u).name}" for u in urls]}}}
    )
    assert dm.epoch_batches(world=2) == 26 // (2 * 4)
    assert datamodule(train_urls=urls[:2]).epoch_batches(world=1) is None  # the index names other shards
    assert datamodule(train_urls=urls, batches_per_epoch=9).epoch_batches(world=2) == 9
    stream = as_rank(dm, 1, 2).train_dataloader().dataset
    assert (stream.rank, stream.world_size, stream.batches_per_epoch, len(stream)) == (1, 2, 3, 12)


def test_fewer_shards_than_readers_is_a_clear_error(tmp_path):
    uneven_shards(tmp_path, "s", [4, 4, 4])
    dm = as_rank(datamodule(train_urls=f"{tmp_path}/*.tar", num_workers=2), 0, 2)
    with pytest.raises(ValueError, match=r"3 training shard\(s\) for 2 rank\(s\) x 2 worker\(s\)"):
        dm.train_dataloader()
    mix = datamodule(
        sources=[
            {"name": "big", "train_urls": f"{tmp_path}/*.tar"},
            {"name": "small", "train_urls": f"{tmp_path}/s0-*.tar"},
        ]
    )
    with pytest.raises(ValueError, match=r"source 'small': 1 training shard\(s\) for 2 rank\(s\)"):
        as_rank(mix, 1, 2).train_dataloader()


def test_validation_gives_every_rank_the_same_batches_without_an_index(tmp_path):
    good = samples("v", 9)
    good[0]["image"] = good[2]["image"] = b"\x89PNG broken"  # both on rank 0 (samples 0, 2, 4, ...)
    write_shards(good[:5], tmp_path, "va", 5)
    write_shards(good[5:], tmp_path, "vb", 5)
    counts = []
    for rank in range(2):
        dm = as_rank(datamodule(val_urls=f"{tmp_path}/*.tar", eval_batch_size=2, num_workers=2), rank, 2)
        batches = list(dm.val_dataloader())
        counts.append(([len(b["keys"]) for b in batches], {k for b in batches for k in b["keys"]}))
    assert sorted(counts[0][0]) == sorted(counts[1][0]) and sum(counts[0][0]) == 9 // 2
    assert not counts[0][1] & counts[1][1]  # rank 0 repeats its own, never rank 1's
    capped = as_rank(datamodule(val_urls=f"{tmp_path}/*.tar", val_samples=4), 1, 2)
    assert sum(len(b["keys"]) for b in capped.val_dataloader()) == 2


# -- bad data -----------------------------------------------------------------------------------------
def write_bad_shards(directory: Path) -> list[str]:
    """Good samples with one of each bad kind among them, and a shard cut off in the middle."""
    good = samples("ok", 12)
    bad = [
        {**good[0], "key": "bad-corrupt", "image": b"\x89PNG\r\n\x1a\n not an image"},
        {**good[0], "key": "bad-missing", "image": None},  # the prompt says <image>, the tar has none
        {**good[0], "key": "bad-empty", "answers": ["", "  "]},
    ]
    urls = write_shards([*good[:3], *bad, *good[3:6]], directory, "mixed", 100)
    with tarfile.open(urls[0], "a") as tar:  # a json member that does not parse
        info = tarfile.TarInfo("bad-json.json")
        info.size = len(b'{"prompt": "<image>", "answers": ["x"]')
        tar.addfile(info, io.BytesIO(b'{"prompt": "<image>", "answers": ["x"]'))
    cut = write_shards(good[6:12], directory, "cut", 100)[0]
    data = Path(cut).read_bytes()
    fourth_image = [i for i in range(len(data)) if data.startswith(b"\x89PNG", i)][3]
    Path(cut).write_bytes(data[: fourth_image + 30])  # ok-6..8 whole, ok-9 cut in its image
    return [urls[0], cut]


def test_every_kind_of_bad_data_is_skipped_counted_and_reported(tmp_path, caplog):
    write_bad_shards(tmp_path)
    dm = datamodule(val_urls=f"{tmp_path}/*.tar", eval_batch_size=4)
    caplog.set_level(logging.INFO, logger="vlm.data.datamodule")
    keys = [k for b in dm.val_dataloader() for k in b["keys"]]
    assert {k for k in keys if k.startswith("ok")} >= {f"ok-{i:05d}" for i in range(6)} | {"ok-00006"}
    assert not [k for k in keys if k.startswith("bad")] and "ok-00009" not in keys
    summary = dm.summary()
    assert {r: summary["skipped"].get(r) for r in BAD_REASONS} == dict.fromkeys(BAD_REASONS, 1)
    assert summary["val"]["samples"] == len(keys) and summary["val"]["sources"] == {"data": len(keys)}
    dm.teardown("fit")
    report = next(r.getMessage() for r in caplog.records if "data summary" in r.getMessage())
    assert all(f"{reason} 1" in report for reason in BAD_REASONS), report


def test_training_reads_on_after_a_truncated_shard(tmp_path):
    urls = write_bad_shards(tmp_path)
    urls += write_shards(samples("more", 8), tmp_path, "more", 4)
    stream = TrainStream(urls, processor(), shuffle_buffer=2, batch_size=4, batches_per_epoch=6)
    batches = list(loader(stream, 4))
    assert len(batches) == 6 and all(len(b["keys"]) == 4 for b in batches)
    assert {k.split("-")[0] for b in batches for k in b["keys"]} == {"ok", "more"}
    skipped = sum((Counter(b["skipped"]) for b in batches), Counter())
    assert all(skipped[reason] >= 1 for reason in BAD_REASONS), skipped


def test_a_source_without_usable_samples_stops_with_its_name(tmp_path):
    bad = [{**s, "answers": [""]} for s in samples("e", 4)]
    urls = write_shards(bad, tmp_path, "empty", 2)
    stream = TrainStream(urls, processor(), batch_size=2, batches_per_epoch=1, name="blank")
    with pytest.raises(RuntimeError, match=r"source 'blank': no usable sample"):
        next(iter(stream))


def test_the_end_of_fit_report_of_a_real_run_names_the_bad_data(make_cfg, tmp_path, caplog):
    write_bad_shards(tmp_path / "coco" / "val")
    uneven_shards(tmp_path / "coco" / "train", "coco", [6, 7])
    cfg = make_cfg(
        "data=coco",
        f"paths.data_dir={tmp_path}",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "data.val_samples=null",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "generation.max_new_tokens=2",
        "test=false",
        *TINY_MODEL,
        tiny=False,
    )
    caplog.set_level(logging.INFO, logger="vlm.data.datamodule")
    from vlm.app.run import train

    train(cfg)
    report = next(r.getMessage() for r in caplog.records if "data summary" in r.getMessage())
    assert "train: loaded 12 samples in 3 batches (coco 12)" in report, report  # Lightning reads one ahead
    assert all(f"{reason} 1" in report for reason in BAD_REASONS), report


# -- several processes --------------------------------------------------------------------------------
class BatchRecorder(L.Callback):
    """Per rank: the keys of each training batch with its epoch, and the validation batch sizes."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.train, self.val = Path(out_dir), [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train.append([trainer.current_epoch, batch["keys"]])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val.append(len(batch["keys"]))

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"train": self.train, "val": self.val}))


def test_ddp_two_processes_two_workers_uneven_shards(tmp_path):
    uneven_shards(tmp_path / "coco" / "train", "coco", [3, 9, 4, 8, 5, 7, 6, 10])
    uneven_shards(tmp_path / "coco" / "val", "val", [2, 7, 4])
    # one corrupt image, which only the rank reading that shard meets: its skip count is synced over
    # ranks at every step, so the other rank must log the same key or the run hangs
    bad = {"key": "bad-0", "image": b"not an image", "image_ext": "png", "task": "caption"}
    write_shards(
        [{**bad, "prompt": "<image>\nDescribe.", "answers": ["x"]}], tmp_path / "coco" / "train", "bad", 1
    )
    out = tmp_path / "record"
    proc = run_cli(
        "train.py",
        "data=coco",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=7",
        "trainer.val_check_interval=7",
        "trainer.enable_progress_bar=false",
        "test=false",
        "logger=csv",
        "generation.max_new_tokens=2",
        f"paths.data_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "data.num_workers=2",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "data.batches_per_epoch=3",
        "data.shuffle_buffer=4",
        "data.val_samples=null",
        *TINY_MODEL,
        "+callbacks.record._target_=tests.test_datamodule.BatchRecorder",
        f"+callbacks.record.out_dir={out}",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for record in ranks:  # epochs of 3 batches, cut at max_steps
        assert [epoch for epoch, _ in record["train"]] == [0, 0, 0, 1, 1, 1, 2]
        assert all(len(keys) == 2 for _, keys in record["train"])
    for epoch in range(3):
        keys = [{k for e, batch in record["train"] if e == epoch for k in batch} for record in ranks]
        assert not keys[0] & keys[1], epoch
    orders = [[k for e, batch in ranks[0]["train"] if e == epoch for k in batch] for epoch in (0, 1)]
    assert orders[0] != orders[1]
    assert ranks[0]["val"] == ranks[1]["val"] and sum(ranks[0]["val"]) == 13 // 2
    assert "data summary (rank 0 of 2)" in proc.stderr + proc.stdout
    assert "corrupt_image" in proc.stderr + proc.stdout


def test_data_configs_compose(make_cfg):
    for name in ("coco", "docvqa", "olmocr", "text", "mix"):
        cfg = make_cfg(f"data={name}", tiny=False)
        dm = instantiate(cfg.data, processor_factory=processor, pad_id=0)
        assert isinstance(dm, ShardDataModule) and dm.name == name
    mix = make_cfg("data=mix", tiny=False).data
    assert [s.name for s in mix.sources] == ["olmocr", "docvqa", "coco", "text"]
    assert sum(s.weight for s in mix.sources if s.name != "text") == pytest.approx(0.9)
