"""Multi-page samples, the longdoc data (generator, pages, both views) and benchmark=longdoc."""

import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vlm import IMAGE_TOKEN
from vlm.app.run import evaluate_checkpoint, train
from vlm.contracts import ImagePreprocessing
from vlm.data.longdoc import FACT, LongDoc, LongDocView, answer_slot, page_texts, paginate, text_prompt
from vlm.data.processing import Collator, SampleProcessor, SkipCounter
from vlm.data.render import load_font, random_style, render
from vlm.data.shards import expand_urls, to_tar_entry, write_shards
from vlm.data.skips import Skip
from vlm.data.stream import EvalStream
from vlm.data.tar_reading import read_shards
from vlm.eval.benchmarks.base import Item, shard_items
from vlm.eval.runner import GenerationCollator, GenerationSet
from vlm.models.llms.tokenizer import ByteTokenizer
from vlm.text_accounting import TextAccounting

FONTS = ["DejaVuSans"]


def png(color: int, size=(64, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def page_sample(key: str, pages: int, prompt: str | None = None) -> dict:
    """A sample whose page i is a flat image of gray level 10 * i (so the order can be read back)."""
    return {
        "key": key,
        "images": [png(10 * i) for i in range(pages)],
        "task": "qa",
        "prompt": IMAGE_TOKEN * pages + "\nQ?" if prompt is None else prompt,
        "answers": ["a"],
    }


def processor(max_length=512, size=(32, 64), vision_tokens=4, train=False) -> SampleProcessor:
    return SampleProcessor(ByteTokenizer(), ImagePreprocessing(size=size), vision_tokens, max_length, train)


def small_longdoc(root, **kw) -> LongDoc:
    args = dict(
        root=str(root), num_train=8, num_val=4, num_test=4, samples_per_shard=4, workers=1, fonts=FONTS
    )
    args |= dict(font_sizes=[13], min_chars=80, max_chars=400)
    return LongDoc(**{**args, **kw})


# ------------------------------------------------------------------------------- multi-page samples
def test_pages_are_written_and_read_back_in_order(tmp_path):
    write_shards(
        [page_sample("doc", 12), {**page_sample("one", 1), "image": png(7), "images": None}],
        tmp_path,
        "s",
        10,
    )
    with tarfile.open(tmp_path / "s-000000.tar") as tar:
        names = tar.getnames()
    assert (
        names[:3] == ["doc.json", "doc.0.png", "doc.1.png"] and "doc.11.png" in names and "one.png" in names
    )
    raws = list(read_shards([str(tmp_path / "s-000000.tar")]))
    _, images = processor().decode(raws[0])
    assert [np.asarray(image)[0, 0] for image in images] == [10 * i for i in range(12)]  # 10 after 9
    assert [np.asarray(image)[0, 0] for image in processor().decode(raws[1])[1]] == [7]
    items = shard_items(str(tmp_path / "s-000000.tar"))
    assert len(items[0].load_images()) == 12 and len(items[1].load_images()) == 1
    with pytest.raises(ValueError, match="both `image` and `images`"):
        to_tar_entry({**page_sample("x", 2), "image": png(0)})


@pytest.mark.parametrize(
    "members, reason",
    [
        ({"0.png": png(0), "2.png": png(0)}, "numbered 0..n-1"),  # a missing page
        ({"0.png": png(0), "png": png(0)}, "plain .png"),  # pages and a plain image
    ],
)
def test_malformed_page_sets_are_named(members, reason):
    raw = {"__key__": "k", "json": json.dumps({"prompt": "<image>", "answers": ["a"]}).encode(), **members}
    with pytest.raises(Skip, match=reason) as error:
        processor().decode(raw)
    assert error.value.reason == "malformed_record"


def test_more_markers_than_pages_is_missing_image_and_too_many_pages_too_long(tmp_path):
    samples = [
        page_sample("short", 2, prompt=IMAGE_TOKEN * 3 + "\nQ?"),
        page_sample("long", 9),  # 9 pages x 4 tokens + prompt + answer > 32
        page_sample("fits", 3),
    ]
    write_shards(samples, tmp_path, "p", 10)
    SkipCounter.drain()
    kept = list(EvalStream(expand_urls(str(tmp_path / "p-*.tar")), processor(max_length=32)))
    assert [s["key"] for s in kept] == ["fits"]
    assert Collator(0)(kept)["skipped"] == {"missing_image": 1, "too_long": 1}


def test_a_batch_with_one_and_three_pages_matches_each_sample_alone():
    from tests.test_models import tiny_vlm

    model = tiny_vlm().eval()  # 32x128 pages -> 4 vision tokens each
    proc = SampleProcessor(model.tokenizer, model.encoder.preprocessing, model.vision_tokens_per_image, 512)
    rng = np.random.default_rng(0)
    pages = [Image.fromarray(rng.integers(0, 255, (32, 128), dtype=np.uint8)) for _ in range(4)]
    samples = []
    for key, images in (("one", pages[:1]), ("three", pages[1:])):
        buffers = [io.BytesIO() for _ in images]
        for image, buffer in zip(images, buffers, strict=True):
            image.save(buffer, format="PNG")
        samples.append(
            proc(to_tar_entry({**page_sample(key, len(images)), "images": [b.getvalue() for b in buffers]}))
        )
    batch = Collator(model.tokenizer.pad_id)(samples)
    image_id = model.tokenizer.image_token_id
    assert batch["images_per_sample"].tolist() == [1, 3] and batch["pixel_values"].shape[0] == 4
    assert (batch["prompt_ids"] == image_id).sum(1).tolist() == [4, 12]  # vision tokens per page: 4
    with torch.no_grad():
        together = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
        for row, sample in enumerate(samples):
            alone = Collator(model.tokenizer.pad_id)([sample])
            logits = model(alone["input_ids"], alone["pixel_values"], alone["attention_mask"]).logits
            length = alone["input_ids"].shape[1]
            assert torch.allclose(together[row, :length], logits[0], atol=1e-5)
    # generation prompts: the same pages from an Item with a list of images
    item = Item("three", [pages[1], pages[2], pages[3]], IMAGE_TOKEN * 3 + "\nQ?", ["a"])
    generated = GenerationCollator(model.tokenizer.pad_id)([GenerationSet([item], proc)[0]])
    assert (generated["prompt_ids"] == image_id).sum().item() == 12
    assert torch.equal(generated["pixel_values"], batch["pixel_values"][1:])


# ---------------------------------------------------------------------------------- the generator
def test_generator_is_deterministic_and_plants_distinct_facts(tmp_path):
    source = small_longdoc(tmp_path, facts_per_doc=3, value_digits=2)
    first, again = source.sample("train", "0000001", FONTS), source.sample("train", "0000001", FONTS)
    assert first == again
    other = source.sample("train", "0000002", FONTS)
    assert other["meta"]["document"] != first["meta"]["document"]
    assert small_longdoc(tmp_path, seed=1).sample("train", "0000001", FONTS) != first
    meta = first["meta"]
    document, facts = meta["document"], meta["facts"]
    assert len(facts) == 3 and len({f["value"] for f in facts}) == 3 and len({f["name"] for f in facts}) == 3
    for fact in facts:
        statement = FACT.format(name=fact["name"], value=fact["value"])
        assert document[fact["start"] : fact["start"] + len(statement)] == statement
        assert len(fact["value"]) == 2
    asked = facts[meta["asked"]]
    assert (
        first["answers"] == [asked["value"]] and meta["question"] == f"What is the code of {asked['name']}?"
    )
    assert first["prompt"] == IMAGE_TOKEN * meta["pages"] + "\n" + meta["question"]
    assert len(first["images"]) == meta["pages"] >= 2
    # lengths: drawn in [min_chars, max_chars] (the filler stops at a word), or as asked
    lengths = [len(source.document("train", str(i)).text) for i in range(30)]
    assert min(lengths) >= source.min_chars - 40 and max(lengths) <= source.max_chars
    assert 1950 <= len(source.document("test", "x", length=2000).text) <= 2000


def test_the_answer_is_drawn_on_the_page_the_generator_names(tmp_path):
    source = small_longdoc(tmp_path, min_chars=300, max_chars=300)
    sample = source.sample("val", "0000001", FONTS)
    meta = sample["meta"]
    pages = paginate(meta["document"], load_font("DejaVuSans", meta["font_size"]), source.image_size)
    assert " ".join(pages) == meta["document"] and len(pages) == meta["pages"] >= 3
    assert [meta["document"].find(page) for page in pages] == meta["page_starts"]
    value, answer_page = sample["answers"][0], meta["answer_page"]
    assert 0 < answer_page < len(pages) - 1  # a page in the middle
    start = meta["answer_start"] - meta["page_starts"][answer_page]
    assert pages[answer_page][start : start + len(value)] == value
    # every page as stored is the page text rendered; changing only the value changes only that page
    drawn = [np.asarray(Image.open(io.BytesIO(b))).astype(int) for b in sample["images"]]
    other = str(int(value) % 900 + 100)
    changed_doc = (
        meta["document"][: meta["answer_start"]] + other + meta["document"][meta["answer_start"] + 3 :]
    )
    style = random_style(random.Random(f"{source.seed}-val-0000001-style"), FONTS, source.font_sizes)
    for i, page in enumerate(
        paginate(changed_doc, load_font(style.font, style.font_size), source.image_size)
    ):
        redrawn = np.asarray(render(page, source.image_size, style).convert("L")).astype(int)
        assert (redrawn != drawn[i]).any() == (i == answer_page), i


# -------------------------------------------------------------------------------------- the views
def test_text_view_keeps_the_beginning_and_fits_the_window():
    proc = processor(max_length=96)
    encode = lambda prompt: proc.encode_prompt(prompt, 0)  # noqa: E731
    values = [str(v) for v in range(100, 1000)]
    slot = answer_slot(proc.tokenizer, values)
    assert slot == 4  # three bytes and eos
    document = " ".join(f"word{i}" for i in range(60))
    question = "What is the code of Alder?"
    prompt, kept = text_prompt(document, question, encode, 96 - slot)
    assert prompt == document[:kept] + "\n" + question and document.startswith(prompt[:kept])
    assert len(encode(prompt)) <= 96 - slot  # with the answer and eos: at most max_length
    next_word = document[: document.index(" ", kept + 1)]
    assert len(encode(next_word + "\n" + question)) > 96 - slot  # one more word would not fit
    short = "A short document."
    assert text_prompt(short, question, encode, 96 - slot) == (short + "\n" + question, len(short))
    with pytest.raises(ValueError, match="question alone"):
        text_prompt(document, question, encode, 10)


def test_views_of_the_same_shard_sample(tmp_path):
    source = small_longdoc(tmp_path, min_chars=380, max_chars=400)
    shards = source.prepare()
    raw = next(read_shards(shards["val"]))
    values = source.values()
    vision = LongDocView(processor(max_length=256, size=(32, 512), vision_tokens=16), "vision", values)(raw)
    pages = json.loads(raw["json"])["meta"]["pages"]
    assert vision["view"] == "vision" and vision["pixel_values"].shape[0] == pages
    assert vision["prompt_ids"].count(ByteTokenizer().image_token_id) == 16 * pages
    text = LongDocView(processor(max_length=128, size=(32, 512)), "text", values)(raw)
    meta = json.loads(raw["json"])["meta"]
    prompt = bytes(i for i in text["prompt_ids"] if i < 256).decode()
    assert text["view"] == "text" and text["pixel_values"].shape[0] == 0
    assert prompt.endswith("\n" + meta["question"]) and meta["document"].startswith(prompt.split("\n")[0])
    assert len(text["prompt_ids"]) + len(text["answer_ids"]) <= 128 < len(meta["document"])
    # each page's own text travels with the vision sample; a batch has one id tensor per page, in order
    page_text = [bytes(ids).decode() for ids in vision["image_text_ids"]]
    assert page_text == page_texts(meta) and " ".join(page_text) == meta["document"]
    batch = Collator(0)([text, vision, text])
    assert [t.tolist() for t in batch["image_text_ids"]] == vision["image_text_ids"]
    assert "image_text_ids" not in Collator(0)([text]) and "image_text_ids" not in Collator(0)(
        [vision, processor(size=(32, 512))(to_tar_entry(page_sample("plain", 1)))]
    )
    both = LongDocView(processor(max_length=256, size=(32, 512)), "both", values)
    views = {key: both.view_of(key) for key in (f"val-{i:07d}" for i in range(40))}
    assert set(views.values()) == {"vision", "text"} and views == {k: both.view_of(k) for k in views}
    with pytest.raises(ValueError, match=r"data\.view='pages'"):
        LongDocView(processor(), "pages", values)
    for view in ("text", "vision"):
        with pytest.raises(Skip, match="not a longdoc sample"):
            LongDocView(processor(), view, values)(to_tar_entry(page_sample("plain", 1)))


def test_follow_ups_ask_every_other_fact_in_training_only(tmp_path):
    source = small_longdoc(tmp_path, min_chars=150, max_chars=200, facts_per_doc=3)
    raw = next(read_shards(source.prepare()["val"]))
    meta = json.loads(raw["json"])["meta"]
    values = source.values()
    train = LongDocView(processor(max_length=512, train=True), "text", values, follow_ups=True)(raw)
    answer = bytes(i for i in train["answer_ids"] if i < 256).decode()
    eos = ByteTokenizer().eos_id
    assert train["answer_ids"].count(eos) == 3 and train["answer_ids"][-1] == eos
    turns = [bytes(turn).decode() for turn in _split(train["answer_ids"], eos)]
    asked = meta["facts"][meta["asked"]]
    assert turns[0] == asked["value"]
    others = {f"\nWhat is the code of {f['name']}?{f['value']}" for f in meta["facts"] if f != asked}
    assert set(turns[1:]) == others and len(answer) == sum(len(t) for t in turns)
    # evaluation keeps the one question; without room, the follow-ups that do not fit are left out
    assert LongDocView(processor(max_length=512), "text", values, follow_ups=True)(raw)["answer_ids"] == [
        *asked["value"].encode(),
        eos,
    ]
    room = len(train["prompt_ids"]) + len(asked["value"]) + 1 + max(len(t) + 1 for t in turns[1:])
    one = LongDocView(processor(max_length=room, train=True), "text", values, follow_ups=True)(raw)
    assert one["answer_ids"].count(eos) == 2


def _split(ids: list[int], sep: int) -> list[list[int]]:
    out, current = [], []
    for i in ids:
        if i == sep:
            out.append(current)
            current = []
        else:
            current.append(i)
    return out


# ------------------------------------------------------------------------------------- the recipes
@pytest.mark.parametrize("experiment", ["longdoc_cpu", "longdoc_gpu"])
def test_recipe_documents_fit_as_pages_overflow_the_text_window_as_bytes_not_as_bpe(make_cfg, experiment):
    """The arithmetic each recipe's comments state, checked on its own longest documents: 4x in bytes,
    about one GPT-2 BPE token per vision token."""
    from hydra.utils import instantiate

    from vlm.models.vlm import VisionLanguageModel

    cfg = make_cfg(f"experiment={experiment}", tiny=False)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert isinstance(model, VisionLanguageModel)
    tokens_per_page, window = model.vision_tokens_per_image, cfg.max_length
    source = instantiate(cfg.data.source, workers=1)
    proc = SampleProcessor(model.tokenizer, model.encoder.preprocessing, tokens_per_page, window)
    budget = window - answer_slot(model.tokenizer, source.values())
    for i in range(3):
        sample = source.sample("test", f"longest{i}", source.available_fonts(), length=source.max_chars)
        meta = sample["meta"]
        assert len(proc.encode_prompt(sample["prompt"], meta["pages"])) <= budget  # every page shown
        _, kept = text_prompt(meta["document"], meta["question"], lambda p: proc.encode_prompt(p, 0), budget)
        assert meta["chars"] >= 3.5 * kept  # the text view sees under a third of it
        accounting = TextAccounting(None, ["bytes", "gpt2"])
        ratios = accounting.ratios(accounting.count(meta["document"]), meta["pages"] * tokens_per_page)
        assert ratios["compression_bytes"] >= 4
        assert 0.8 <= ratios["compression_gpt2"] <= 1.2


# ----------------------------------------------------------------------- training and the benchmark
def recipe_overrides(data, run) -> list[str]:
    """experiment=longdoc_cpu at test size: tiny parts, a few dozen documents, two steps."""
    return [
        f"paths.data_dir={data}",
        f"hydra.run.dir={run}",
        "logger=csv",
        "experiment=longdoc_cpu",
        "sizes=tiny",
        "data.source.num_train=32",
        "data.source.num_val=8",
        "data.source.num_test=8",
        "data.source.samples_per_shard=16",
        "data.source.workers=1",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "data.val_samples=8",
        "data.shuffle_buffer=8",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "test=false",
    ]


@pytest.fixture(scope="module")
def longdoc_checkpoint(tmp_path_factory):
    """A tiny model trained for two steps on data=longdoc with both views, on the next-token loss alone
    (shared by the benchmark tests)."""
    from vlm.config import compose

    run, data = tmp_path_factory.mktemp("longdoc_run"), tmp_path_factory.mktemp("longdoc_data")
    train(compose("train", [*recipe_overrides(data, run), "loss.ctc_weight=0", "loss.chunk_weight=0"]))
    return next((run / "checkpoints").glob("step*.ckpt")), data


def test_the_cpu_recipe_reads_every_page_with_the_auxiliary_losses(tmp_path):
    """Its CTC and chunk losses read each page's own text (batch["image_text_ids"]), whatever the
    number of pages per sample (vlm/training/aux_losses.py `answer_targets`)."""
    from vlm.config import compose

    metrics = train(compose("train", recipe_overrides(tmp_path / "data", tmp_path / "run")))
    for name in ("train/loss_ctc", "train/loss_chunk"):
        assert 0 < metrics[name] < float("inf"), name


def test_reading_losses_take_each_page_text_and_else_need_one_image_per_sample():
    from vlm.training.aux_losses import answer_targets

    pages = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    batch = {"pixel_values": torch.zeros(2, 3, 8, 8), "images_per_sample": torch.tensor([2, 0])}
    assert answer_targets({**batch, "image_text_ids": pages}, 9, "loss.ctc_weight") == pages
    with pytest.raises(ValueError, match="1 image texts for 2 images"):
        answer_targets({**batch, "image_text_ids": pages[:1]}, 9, "loss.ctc_weight")
    with pytest.raises(ValueError, match=r"loss\.chunk_weight > 0 needs exactly one image per sample"):
        answer_targets({**batch, "labels": torch.zeros(2, 4, dtype=torch.long)}, 9, "loss.chunk_weight")


def test_benchmark_writes_the_curves_of_both_views(longdoc_checkpoint, tmp_path):
    from vlm.config import compose

    checkpoint, data = longdoc_checkpoint
    out = tmp_path / "eval"
    cfg = compose(
        "eval",
        [
            f"paths.data_dir={data}",
            f"hydra.run.dir={out}",
            "logger=csv",
            "benchmark=longdoc",
            f"ckpt_path={checkpoint}",
            "benchmark.lengths=[60,200,2000]",
            "benchmark.samples_per_length=2",
        ],
    )
    metrics = evaluate_checkpoint(cfg)
    curve = json.loads((out / "tables.json").read_text())["curve"]
    assert [p["length"] for p in curve] == [60, 200, 2000] and all(p["documents"] == 2 for p in curve)
    window = metrics["text_window_tokens"]
    assert curve[0]["text_tokens"] < window < curve[2]["text_tokens"]
    assert curve[0]["fits_as_text"] == 1.0 and curve[2]["fits_as_text"] == 0.0
    assert curve[0]["full_text_questions"] == 2 and curve[2]["full_text_questions"] == 0
    assert curve[2]["full_text_exact_match"] is None and curve[2]["text_questions"] == 2
    assert curve[2]["text_kept_share"] < 0.5
    llm = next(key for key in curve[0] if key.startswith("tokens_llm_"))
    for point in curve:  # each tokenizer's tokens (the model's among them) / the pages' vision tokens
        assert point[llm] == pytest.approx(point["text_tokens"])
        for key in (llm, "tokens_bytes", "tokens_gpt2"):
            compression = f"compression_{key.removeprefix('tokens_')}"
            assert point[compression] == pytest.approx(point[key] / point["vision_tokens"])
        assert point["chars_per_vision_token"] == pytest.approx(point["chars"] / point["vision_tokens"])
    assert curve[2]["vision_questions"] == 0 and curve[2]["vision_exact_match"] is None  # pages do not fit
    assert curve[0]["vision_questions"] == 2
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 2 + 2 * 2  # text for every document, vision where the pages fit
    assert {s["view"] for s in samples} == {"vision", "text"}
    assert metrics["vision"]["seconds_per_question"] > 0 and metrics["text"]["seconds_per_question"] > 0
    assert "no vision answer" in (out / "report.md").read_text()
    assert (out / "plots" / "accuracy_vs_length.png").stat().st_size > 1000
    predictions = json.loads((out / "predictions" / "predictions.json").read_text())
    assert set(predictions) == {s["key"] for s in samples}
