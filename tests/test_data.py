import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from vlm import IGNORE_INDEX, corpus
from vlm.contracts import ImagePreprocessing
from vlm.data.processing import Collator, SampleProcessor, SkipCounter
from vlm.data.render import RenderStyle, render
from vlm.data.shards import expand_urls, write_shards
from vlm.data.stream import EvalStream, TrainStream
from vlm.data.synthetic import SyntheticText
from vlm.models.llms.tokenizer import ByteTokenizer


def small_source(root, **kw) -> SyntheticText:
    args = dict(root=str(root), num_train=40, num_val=8, num_test=8, samples_per_shard=10, workers=1)
    return SyntheticText(**{**args, **kw})


def read_tar(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_splits_have_disjoint_text():
    texts = {split: set(corpus.snippets(split, 300, 32, 64, seed=0)) for split in corpus.SPLITS}
    assert not texts["train"] & texts["test"]
    assert not texts["train"] & texts["val"]
    assert not texts["val"] & texts["test"]
    train_paragraphs = set(corpus.paragraphs_for("train"))
    assert not train_paragraphs & set(corpus.paragraphs_for("test"))


def test_snippets_are_deterministic_and_within_bounds():
    a = corpus.snippets("train", 50, 32, 64, seed=3)
    assert a == corpus.snippets("train", 50, 32, 64, seed=3)
    assert a != corpus.snippets("train", 50, 32, 64, seed=4)
    assert all(32 <= len(s) <= 64 for s in a)


def test_render_wraps_and_refuses_what_does_not_fit():
    style = RenderStyle(font="DejaVuSans", font_size=14)
    image = render("a few words", (32, 128), style)
    assert image.size == (128, 32)
    assert min(image.convert("L").getdata()) < 100  # something was drawn
    with pytest.raises(ValueError, match="do not fit"):
        render("many words " * 20, (32, 128), style)


def test_synthetic_shards_are_written_once_in_the_common_schema(tmp_path):
    source = small_source(tmp_path)
    shards = source.prepare()
    assert set(shards) == {"train", "val", "test"} and len(shards["train"]) >= 4
    mtime = (source.directory / "index.json").stat().st_mtime
    assert source.prepare() == shards and (source.directory / "index.json").stat().st_mtime == mtime
    members = read_tar(shards["val"][0])
    key = sorted(members)[0].split(".")[0]
    record = json.loads(members[f"{key}.json"])
    assert record["task"] == "ocr" and "<image>" in record["prompt"]
    assert 32 <= len(record["answers"][0]) <= 64
    assert Image.open(io.BytesIO(members[f"{key}.png"])).size == (512, 32)


def test_a_recipe_rendered_by_two_processes_at_once_keeps_the_first_shards(tmp_path):
    """Each process renders into a folder of its own; the one that finishes second finds the recipe's
    folder written (by the first) and drops its copy."""
    source = small_source(tmp_path)
    shards = source.prepare()
    first = read_tar(shards["val"][0])
    source._write()  # what the slower of two processes does after the other one finished
    assert source.prepare() == shards and read_tar(shards["val"][0]) == first
    assert [p.name for p in source.directory.parent.iterdir()] == [source.directory.name]  # no .tmp left


def test_synthetic_is_deterministic(tmp_path):
    a = small_source(tmp_path / "a").prepare()["test"][0]
    b = small_source(tmp_path / "b").prepare()["test"][0]
    assert read_tar(a) == read_tar(b)
    assert small_source(tmp_path, seed=1).directory != small_source(tmp_path).directory


def processor(train=True) -> SampleProcessor:
    return SampleProcessor(
        ByteTokenizer(), ImagePreprocessing(size=(32, 512)), vision_tokens_per_image=4, train=train
    )


def test_labels_cover_only_the_answer(tmp_path):
    shard = small_source(tmp_path).prepare()["val"][0]
    raw = next(iter(EvalStream([shard], lambda r: r)))
    sample = processor()(raw)
    tok = ByteTokenizer()
    answer = json.loads(raw["json"])["answers"][0]
    n_answer = len(answer.encode()) + 1
    assert sample["answer_ids"] == [*answer.encode(), tok.eos_id]
    assert sample["prompt_ids"].count(tok.image_token_id) == 4
    assert sample["pixel_values"].shape == (1, 3, 32, 512)
    short = {**sample, "key": "short", "answer_ids": sample["answer_ids"][-2:]}  # a shorter row pads
    batch = Collator(tok.pad_id)([sample, short])
    labels, n_prompt = batch["labels"], len(sample["prompt_ids"])
    assert labels[0, -n_answer:].tolist() == [*answer.encode(), tok.eos_id]
    assert (labels[0, :-n_answer] == IGNORE_INDEX).all()
    assert labels[1, n_prompt : n_prompt + 2].tolist() == sample["answer_ids"][-2:]
    assert (labels[1, :n_prompt] == IGNORE_INDEX).all() and (labels[1, n_prompt + 2 :] == IGNORE_INDEX).all()
    assert batch["input_ids"][0].tolist() == [*sample["prompt_ids"], *sample["answer_ids"]]
    assert (batch["input_ids"][1, n_prompt + 2 :] == tok.pad_id).all()
    assert batch["attention_mask"].sum(1).tolist() == [n_prompt + n_answer, n_prompt + 2]
    assert batch["prompt_ids"][0].tolist() == list(sample["prompt_ids"])
    assert batch["prompt_mask"][:, 0].tolist() == [1, 1]


def test_ranks_and_workers_read_disjoint_shards():
    urls = [f"shard-{i}.tar" for i in range(8)]
    seen = []
    for rank in range(2):
        stream = TrainStream(urls, lambda r: r, rank=rank, world_size=2, seed=5)
        it = stream.train_shards()
        seen.append([next(it)["url"] for _ in range(4)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(urls)


def test_too_few_shards_for_the_readers_is_a_clear_error():
    stream = TrainStream(["one.tar"], lambda r: r, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"1 training shard\(s\) for 2 rank\(s\)"):
        next(stream.train_shards())


def test_evaluation_gives_every_rank_the_same_count(tmp_path):
    shards = small_source(tmp_path, num_val=9).prepare()["val"]
    keys = [
        [s["key"] for s in EvalStream(shards, processor(False), rank=r, world_size=2, samples_per_rank=4)]
        for r in range(2)
    ]
    assert len(keys[0]) == len(keys[1]) == 4 and not set(keys[0]) & set(keys[1])


def test_corrupt_and_malformed_samples_are_skipped_and_counted(tmp_path):
    buffer = io.BytesIO()
    render("fine text", (32, 512), RenderStyle("DejaVuSans", 14)).save(buffer, format="PNG")
    good = {
        "key": "good",
        "image": buffer.getvalue(),
        "task": "ocr",
        "prompt": "<image>\nRead.",
        "answers": ["fine text"],
    }
    corrupt = {**good, "key": "corrupt", "image": b"\x89PNG this is not an image"}
    malformed = {**good, "key": "malformed", "answers": []}
    shards = write_shards([good, corrupt, good | {"key": "good2"}, malformed], tmp_path, "mixed", 10)
    SkipCounter.drain()
    samples = list(EvalStream(expand_urls(str(tmp_path / "mixed-*.tar")), processor(False)))
    assert [s["key"] for s in samples] == ["good", "good2"]
    batch = Collator(0)(samples)
    assert batch["skipped"] == {"corrupt_image": 1, "malformed_record": 1}
    assert shards


def test_image_processor_pads_with_gray():
    from vlm.data.processing import ImageProcessor

    prep = ImagePreprocessing(size=(64, 64), resize="pad")
    out = ImageProcessor(prep)(Image.new("RGB", (64, 16), (255, 255, 255)))
    assert out.shape == (3, 64, 64)
    gray = (127 / 255 - 0.5) / 0.5
    assert torch.allclose(out[:, 0, 0], torch.full((3,), gray))
    assert torch.allclose(out[:, 32, 32], torch.ones(3))
