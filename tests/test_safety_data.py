"""Bad data in the training/evaluation stream is skipped, counted by reason and named, never fatal:
deep or invalid JSON, members and images over the limits (sparse members, gzip bombs, pixel bombs),
hidden members; and images decode to the pixels they show (alpha, 16-bit, float)."""

import io
import logging
import resource
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_datamodule import png, processor, samples
from vlm.contracts import ImagePreprocessing
from vlm.data.datamodule import ShardDataModule
from vlm.data.images import open_image, to_rgb
from vlm.data.processing import ImageProcessor, SkipCounter, load_record
from vlm.data.shards import tar_keys, to_tar_entry, write_shards
from vlm.data.skips import Skip
from vlm.data.stream import EvalStream, TrainStream
from vlm.data.tar_reading import ReadLimits, count_samples, read_shards

GiB = 2**30


@pytest.fixture(autouse=True)
def fresh_skip_counts():
    SkipCounter.drain()
    SkipCounter.warned.clear()  # so that each test sees its own warnings
    yield
    SkipCounter.drain()


@pytest.fixture
def memory_cap():
    """This process may map only 256 MiB more while the test runs: reading a member of gigabytes fails
    (MemoryError) instead of taking the machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped_kb = next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmSize:")
    )
    resource.setrlimit(resource.RLIMIT_AS, (mapped_kb * 1024 + 256 * 2**20, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def members(sample: dict) -> list[tuple[str, bytes]]:
    """A sample as tar members (name, data)."""
    entry = to_tar_entry(sample)
    key = entry.pop("__key__")
    return [(f"{key}.{ext}", data) for ext, data in entry.items()]


def write_tar(path: Path, items: list, mode: str = "w", **options) -> str:
    """A tar of items in order: samples (dicts), (name, data) members, (TarInfo, file) members, or
    hand-made header (and data) bytes, written as they are."""
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT, **options) as tar:
        for item in items:
            if isinstance(item, bytes):
                tar.fileobj.write(item)
                tar.offset += len(item)
                continue
            if isinstance(item, tuple) and isinstance(item[0], tarfile.TarInfo):
                tar.addfile(*item)
                continue
            for name, data in members(item) if isinstance(item, dict) else [item]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def sparse_member(name: str, declared: int) -> bytes:
    """A GNU sparse member: one header and 512 stored bytes that expand to `declared` bytes."""
    info = tarfile.TarInfo(name)
    info.size = 512
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[386:410] = tarfile.itn(0, 12, tarfile.GNU_FORMAT) + tarfile.itn(512, 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(declared, 12, tarfile.GNU_FORMAT)
    return checksummed(header) + b"x" * 512


def checksummed(header: bytearray) -> bytes:
    """A tar header with its checksum redone after an edit."""
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height pixels (nothing of them is stored)."""
    data = bytearray(png())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def read(urls: list[str], limits: ReadLimits | None = None) -> tuple[list[str], dict[str, int]]:
    """(keys of the usable samples, skipped counts) of an evaluation pass over the shards."""
    stream = EvalStream(urls, processor(False), limits=limits or ReadLimits())
    keys = [s["key"] for s in stream]
    return keys, SkipCounter.drain()


# -- records ------------------------------------------------------------------------------------------
def test_a_record_nested_200k_deep_is_skipped_as_malformed_record(tmp_path):
    url = write_tar(
        tmp_path / "deep.tar",
        [
            samples("a", 1)[0],
            ("deep.json", b"[" * 200_000),
            ("deeper.json", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
        ],
    )
    keys, skipped = read([url])
    assert keys == ["a-00000"] and skipped == {"malformed_record": 2}
    with pytest.raises(Skip, match=r"malformed_record \(nested 200000 deep"):
        load_record(b"[" * 200_000, "deep")


def test_deep_json_cannot_crash_the_interpreter_even_with_a_raised_recursion_limit():
    """json.loads recurses in C per level: with a raised limit, 200k levels overflow the stack (SIGSEGV)."""
    code = (
        "import sys; sys.setrecursionlimit(10**6)\n"
        "from vlm.data.processing import load_record\nfrom vlm.data.skips import Skip\n"
        "try:\n    load_record(b'[' * 200_000, 'deep')\nexcept Skip as error:\n    print(error.reason)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "malformed_record", run


def test_a_lone_surrogate_is_skipped_as_invalid_unicode_and_a_pair_is_kept(tmp_path):
    base = samples("u", 4)
    lone_answer = {**base[1], "answers": ["caf\ud800"]}  # json.dumps writes it as "\ud800"
    lone_prompt = {**base[2], "prompt": "<image>\nRead \udc00."}
    pair = {**base[3], "answers": ["smile \U0001f600"]}  # written as the pair "\ud83d\ude00"
    url = write_shards([base[0], lone_answer, lone_prompt, pair], tmp_path, "u", 10)[0]
    keys, skipped = read([url])
    assert keys == ["u-00000", "u-00003"] and skipped == {"invalid_unicode": 2}
    with pytest.raises(Skip, match="invalid_unicode"):  # a record given as text, the surrogate unescaped
        load_record('{"answers": ["\ud800"]}', "k")


# -- members and images over the limits ---------------------------------------------------------------
def test_a_sparse_member_declaring_7_gb_is_skipped_without_being_read(tmp_path, memory_cap, caplog):
    url = write_tar(
        tmp_path / "sparse.tar",
        [
            *samples("s", 1),
            ("big.json", members(samples("big", 1)[0])[0][1]),
            sparse_member("big.png", 7 * GiB),
            *samples("t", 2),
        ],
    )
    assert Path(url).stat().st_size < 20_000
    keys, skipped = read([url])
    assert keys == ["s-00000", "t-00000", "t-00001"] and skipped == {"too_large": 1}
    warning = next(r.getMessage() for r in caplog.records if "too_large" in r.getMessage())
    assert "'big'" in warning and f"{url}: big.png: {7 * GiB} bytes" in warning, warning
    assert count_samples([url]) == 4  # headers only, under the same memory cap


def test_a_gzip_bomb_member_is_skipped_and_reading_goes_on(tmp_path, memory_cap):
    """A 256 MiB member in a ~1 MB .tar.gz: skipped from its header; inflating past it takes bounded
    memory (the cap would stop a read of it)."""

    class Zeros(io.RawIOBase):
        def __init__(self, size: int) -> None:
            self.left = size

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            n = min(len(buffer), self.left)
            buffer[:n] = bytes(n)
            self.left -= n
            return n

    bomb = tarfile.TarInfo("bomb.png")
    bomb.size = 256 * 2**20
    items = [
        *samples("g", 1),
        ("bomb.json", members(samples("x", 1)[0])[0][1]),
        (bomb, io.BufferedReader(Zeros(bomb.size), 2**20)),
        *samples("h", 1),
    ]
    path = Path(write_tar(tmp_path / "bomb.tar.gz", items, "w:gz", compresslevel=1))
    assert path.stat().st_size < 2 * 2**20
    keys, skipped = read([str(path)], ReadLimits(max_member_bytes=2**20))
    assert keys == ["g-00000", "h-00000"] and skipped == {"too_large": 1}


def test_reading_keeps_no_tar_headers_behind(tmp_path, monkeypatch):
    """tarfile keeps every header it reads: a few MB of gzip'd empty members would fill the memory."""
    kept = []
    next_header = tarfile.TarFile.next

    def counting_next(tar):
        kept.append(len(tar.members))
        return next_header(tar)

    monkeypatch.setattr(tarfile.TarFile, "next", counting_next)
    url = write_shards(samples("m", 50), tmp_path, "m", 100)[0]
    keys, _ = read([url])
    assert len(keys) == 50 and count_samples([url]) == 50
    assert len(kept) > 200 and max(kept) <= 1


def test_headers_too_large_to_hold_end_the_shard_as_too_large(tmp_path):
    long_name = tarfile.TarInfo("././@LongLink")
    long_name.type, long_name.size = tarfile.GNUTYPE_LONGNAME, GiB  # tarfile would read 1 GiB of name
    extended = bytearray(sparse_member("ext.png", 2**20)[:512])
    extended[482] = 1  # a sparse map continued in extra blocks, which tarfile collects without a limit
    pax_sparse = tarfile.TarInfo("pax.png")  # GNU sparse 1.0: the map is read from the data, unbounded
    pax_sparse.size, pax_sparse.pax_headers = 512, {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}
    headers = [
        long_name.tobuf(tarfile.GNU_FORMAT),
        checksummed(extended),
        pax_sparse.tobuf(tarfile.PAX_FORMAT),
    ]
    for n, header in enumerate(headers):
        url = write_tar(tmp_path / f"h{n}.tar", [*samples("ok", 2), header + bytes(1024)])
        keys, skipped = read([url])  # ok-00001 was being read at the break (more of it could follow)
        assert keys == ["ok-00000"] and skipped == {"too_large": 1}, (n, skipped)


def test_images_over_the_pixel_limit_are_skipped_before_decoding(tmp_path):
    base = samples("p", 3)
    bomb = {**base[1], "image": png_claiming(100_000, 100_000)}  # over Pillow's own limit too
    url = write_shards([base[0], bomb, base[2]], tmp_path, "p", 10)[0]
    keys, skipped = read([url])
    assert keys == ["p-00000", "p-00002"] and skipped == {"image_too_large": 1}
    keys, skipped = read([url], ReadLimits(max_image_pixels=63))  # the good ones are 8x8
    assert keys == [] and skipped == {"image_too_large": 3}
    raw = {"__key__": "bomb", "json": members(base[1])[0][1], "png": png_claiming(100_000, 100_000)}
    with pytest.raises(Skip, match="image_too_large"):  # a raw sample that bypassed the reader
        processor().decode(raw)


def test_an_image_member_in_another_format_is_not_opened_as_that_format():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"  # Pillow would hand EPS to Ghostscript
    assert Image.open(io.BytesIO(eps)).format == "EPS"
    with pytest.raises(Image.UnidentifiedImageError):
        open_image(eps)
    raw = {"__key__": "eps", "json": members(samples("e", 1)[0])[0][1], "png": eps}
    with pytest.raises(Skip, match="corrupt_image"):
        processor().decode(raw)


def test_the_datamodule_takes_its_limits_from_the_config_and_reports_every_new_reason(tmp_path, caplog):
    base = samples("ok", 4)
    items = [
        base[0],
        ("deep.json", b"[" * 1000),
        {**samples("big", 1)[0], "image": bytes(4096)},
        {**samples("wide", 1)[0], "image": png_claiming(300, 300)},
        {**samples("lone", 1)[0], "answers": ["\udfff"]},
        ("__MACOSX/._ok-00001.png", b"apple double"),
        ("README", b"notes"),
        base[1],
    ]
    write_tar(tmp_path / "all.tar", items)
    dm = ShardDataModule(
        processor,
        pad_id=0,
        val_urls=str(tmp_path / "all.tar"),
        eval_batch_size=4,
        max_member_bytes=2048,
        max_image_pixels=10_000,
    )
    caplog.set_level(logging.INFO, logger="vlm.data.datamodule")
    keys = [k for batch in dm.val_dataloader() for k in batch["keys"]]
    assert set(keys) == {"ok-00000", "ok-00001"}  # repeated to the 6 samples the headers promise
    reasons = (
        "malformed_record",
        "too_large",
        "image_too_large",
        "invalid_unicode",
        "hidden_member",
        "stray_member",
    )
    assert dm.summary()["skipped"] == dict.fromkeys(reasons, 1)
    dm.teardown("fit")
    report = next(r.getMessage() for r in caplog.records if "data summary" in r.getMessage())
    assert all(f"{reason} 1" in report for reason in reasons), report


def test_training_goes_on_past_every_kind_of_bad_member(tmp_path, memory_cap):
    bad = [
        ("deep.json", b"[" * 200_000),
        sparse_member("huge.png", 7 * GiB),
        ("huge.json", members(samples("huge", 1)[0])[0][1]),
        {**samples("lone", 1)[0], "answers": ["\ud800"]},
        (".hidden.png", png()),
    ]
    urls = [write_tar(tmp_path / f"t{n}.tar", [*bad, *samples(f"g{n}", 3)]) for n in range(2)]
    stream = TrainStream(urls, processor(), shuffle_buffer=2, batch_size=2, batches_per_epoch=6)
    produced = list(stream)
    assert len(produced) == 12 and {s["key"][:2] for s in produced} == {"g0", "g1"}
    skipped = Counter(SkipCounter.drain())
    assert all(skipped[r] >= 2 for r in ("malformed_record", "too_large", "invalid_unicode", "hidden_member"))


# -- hidden members -----------------------------------------------------------------------------------
def test_hidden_and_stray_members_are_counted_not_silently_dropped(tmp_path):
    items = [
        samples("k", 1)[0],
        (".hidden.png", png()),
        ("._k-00000.png", b"apple double"),
        ("__MACOSX/k-00000.png", png()),
        ("__MACOSX/._k-00000.png", b"apple double"),
        ("notes", b"no extension"),
        *samples("k", 2)[1:],
    ]
    path = tmp_path / "hidden.tar"
    write_tar(path, items)
    with tarfile.open(path, "a") as tar:
        folder = tarfile.TarInfo("pages")
        folder.type = tarfile.DIRTYPE  # folders are structure: not counted
        link = tarfile.TarInfo("k-00001.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(folder)
        tar.addfile(link)
    keys, skipped = read([str(path)])
    assert keys == ["k-00000", "k-00001"]
    assert skipped == {"hidden_member": 4, "stray_member": 2}
    assert count_samples([str(path)]) == 2 and tar_keys(path) == ["k-00000", "k-00001"]
    raws = list(read_shards([str(path)], quiet=True))
    assert [sorted(r) for r in raws] == [["__key__", "__url__", "json", "png"]] * 2


# -- images for the model -----------------------------------------------------------------------------
def pixels(image: Image.Image) -> np.ndarray:
    converted = to_rgb(image)
    assert converted.mode == "RGB"
    return np.asarray(converted)


def test_transparent_images_are_composed_onto_white():
    text = np.zeros((4, 4, 4), dtype=np.uint8)  # black, transparent ...
    text[1, 1] = (0, 0, 0, 255)  # ... but for one opaque black pixel of "text"
    text[2, 2] = (0, 0, 0, 128)  # and one half-transparent
    rgba = Image.fromarray(text)
    assert np.asarray(rgba.convert("RGB")).max() == 0  # what plain convert("RGB") shows: all black
    out = pixels(rgba)
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [0, 0, 0]
    assert abs(int(out[2, 2, 0]) - 127) <= 1
    assert pixels(rgba.convert("LA"))[:, :, 0].tolist() == out[:, :, 0].tolist()
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 200, 0, 0])
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0  # index 0 (black) is transparent
    out = pixels(palette)
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [200, 0, 0]


def test_16_bit_scans_are_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16)
    scan = Image.fromarray(levels)
    assert scan.mode == "I;16" and np.asarray(scan.convert("RGB"))[0, :, 0].tolist() == [0, 255, 255, 255]
    expected = [0, 64, 128, 255]
    assert pixels(scan)[0, :, 0].tolist() == expected
    scan.save(tmp_path / "scan.png")  # and as read back from a 16-bit PNG (Pillow: I;16 or I)
    reread = open_image((tmp_path / "scan.png").read_bytes())
    assert pixels(reread)[0, :, 0].tolist() == expected
    wide = Image.fromarray(np.array([[-100, 0, 100_000]], dtype=np.int32))  # not 16-bit: stretched
    assert pixels(wide)[0, :, 0].tolist() == [0, 0, 255]


def test_float_images_read_0_to_1_or_their_own_range():
    unit = Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32))
    assert pixels(unit)[0, :, 0].tolist() == [0, 64, 255]
    ranged = Image.fromarray(np.array([[-1.0, 1.0, 3.0, np.nan]], dtype=np.float32))
    assert pixels(ranged)[0, :, 0].tolist() == [0, 128, 255, 64]  # NaN reads as 0


def test_the_model_sees_dark_text_on_white_from_a_transparent_png():
    text = np.zeros((8, 8, 4), dtype=np.uint8)
    text[4, :] = (0, 0, 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(text).save(buffer, format="PNG")
    raw = {"__key__": "t", "json": members(samples("t", 1)[0])[0][1], "png": buffer.getvalue()}
    sample = processor(False)(raw)
    views = ImageProcessor(ImagePreprocessing(size=(8, 8)))(open_image(raw["png"]))
    assert (
        sample["pixel_values"].shape == (1, 3, 32, 32)
        and sample["pixel_values"][0, :, 0, 0].tolist() == [1.0] * 3
    )
    assert views[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and views[:, 4, 4].tolist() == [-1.0, -1.0, -1.0]
