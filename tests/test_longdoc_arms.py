"""The long-document experiment's arms in BPE units: the recipes' arithmetic, text arms over several
<image>s (pages), the data views against the context arms, the OCR-then-truncate view, the arms table,
and a sweep of every arm through the CLI."""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from hydra.errors import InstantiationException

from tests.conftest import run_cli
from tests.helpers import OCR_ENGINES_MISSING
from vlm import IMAGE_TOKEN
from vlm.app.longdoc_table import main as table_main
from vlm.contracts import ImagePreprocessing, context_inputs
from vlm.data.longdoc import NAMES, LongDoc, LongDocView, answer_slot, page_texts, paginate, text_prompt
from vlm.data.processing import Collator, SampleProcessor
from vlm.data.render import load_font
from vlm.data.skips import Skip
from vlm.data.tar_reading import read_shards
from vlm.eval.arms_table import wilson_interval
from vlm.eval.benchmarks.base import Context
from vlm.eval.benchmarks.longdoc import LongDocBenchmark, ocr_document
from vlm.eval.longdoc_table import two_level_interval, write_table
from vlm.models.llms.tokenizer import ByteTokenizer
from vlm.training.module import VLMModule

ONE_FONT = {"fonts": ["DejaVuSans"], "font_sizes": [13]}
ARMS = ("vision", "truncate", "text_meanpool", "text_conv", "full_text")
PAGES = ["the first page of text", "a second page, longer than the first one is", "page three"]


def raw(key: str, prompt: str, context_text) -> dict:
    """A raw shard sample with no image, its record's context_text as given."""
    record = {"prompt": prompt, "answers": ["42"], "task": "qa", "context_text": context_text}
    return {"__key__": key, "json": json.dumps(record).encode()}


def text_arm(make_cfg, context: str) -> tuple[VLMModule, SampleProcessor]:
    module = VLMModule(make_cfg(f"context={context}"))
    model = module.model
    proc = SampleProcessor(
        model.tokenizer, model.encoder.preprocessing, model.vision_tokens_per_image, 512, context=context
    )
    return module, proc


def small_longdoc(root, **kw) -> LongDoc:
    args = dict(root=str(root), num_train=4, num_val=4, num_test=4, samples_per_shard=4, workers=1)
    args |= dict(fonts=["DejaVuSans"], font_sizes=[13], min_chars=200, max_chars=260, facts_per_doc=4)
    return LongDoc(**{**args, "value_digits": 4, **kw})


# ------------------------------------------------------------------------------ the recipes' arithmetic
@pytest.mark.parametrize("experiment", ["longdoc_bpe_cpu", "longdoc_bpe_gpu"])
def test_documents_overflow_the_bpe_window_twice_and_their_pages_fit_it(make_cfg, experiment):
    """What the recipe's comments state, with its own BPE tokenizer and pagination, on its longest
    documents: at least 2x max_length in BPE tokens, every page shown as vision tokens within the window,
    the full_text arm's window holding the document whole."""
    from hydra.utils import instantiate

    cfg = make_cfg(f"experiment={experiment}", tiny=False)
    assert cfg.llm.tokenizer == "bpe" and cfg.llm.tokenizer_vocab_size == 1024
    assert cfg.context.name == "vision" and cfg.data.view == "vision"  # the default arm
    with torch.device("meta"):
        model = instantiate(cfg.model)
    tokenizer, K, window = model.tokenizer, model.vision_tokens_per_image, cfg.max_length
    assert K == 8  # the tiny encoder's 2x32 grid per 32x512 page, pixel shuffle [2, 4]
    source = instantiate(cfg.data.source, workers=1)
    assert source.facts_per_doc >= 4 and source.value_digits == 4
    proc = SampleProcessor(tokenizer, model.encoder.preprocessing, K, window)
    encode = lambda prompt: proc.encode_prompt(prompt, 0)  # noqa: E731
    slot = answer_slot(tokenizer, source.values())
    assert slot == 5  # a 4-digit value: at most 4 BPE tokens, + eos
    budget = window - slot
    font = load_font("DejaVuSans", 13)
    checked = 0
    for i in range(6):
        sample = source.sample("test", f"longest{i}", source.available_fonts(), length=source.max_chars)
        if sample is None:  # a word wider than the page: not rendered
            continue
        meta = sample["meta"]
        assert len(paginate(meta["document"], font, source.image_size)) == meta["pages"]
        document_tokens = len(tokenizer.encode(meta["document"]))
        assert document_tokens >= 2 * window, (document_tokens, window)
        assert len(proc.encode_prompt(sample["prompt"], meta["pages"])) <= budget  # every page shown
        _, kept = text_prompt(meta["document"], meta["question"], encode, budget)
        assert kept < meta["chars"] / 2  # the truncate arm sees under half of it
        full_budget = cfg.full_text_max_length - slot
        assert text_prompt(meta["document"], meta["question"], encode, full_budget)[1] == meta["chars"]
        checked += 1
    assert checked >= 4
    # the question of any name fits the 15 tokens the comments count ("\n" + question)
    assert max(len(tokenizer.encode("\n" + source.question.format(name=n))) for n in NAMES) <= 15


def test_text_pretraining_reads_its_documents_whole_with_every_follow_up(make_cfg):
    """longdoc_arm=text_pretraining's comments: its longest documents fit the text view whole, and the
    three follow-up questions with their values fit after the answer (measured with the real BPE)."""
    from hydra.utils import instantiate

    cfg = make_cfg("experiment=longdoc_bpe_cpu", "longdoc_arm=text_pretraining", tiny=False)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    tokenizer, window = model.tokenizer, cfg.max_length
    source = instantiate(cfg.data.source, workers=1)
    proc = SampleProcessor(tokenizer, model.encoder.preprocessing, model.vision_tokens_per_image, window)
    encode = lambda prompt: proc.encode_prompt(prompt, 0)  # noqa: E731
    slot = answer_slot(tokenizer, source.values())
    for i in range(8):
        doc = source.document("train", f"longest{i}", length=source.max_chars)
        answer = doc.answer
        prompt, kept = text_prompt(doc.text, source.question.format(name=answer.name), encode, window - slot)
        assert kept == len(doc.text)  # nothing cut
        follow_ups = sum(
            len(tokenizer.encode("\n" + source.question.format(name=f.name) + f.value)) + 1
            for f in doc.facts
            if f is not answer
        )
        used = len(encode(prompt)) + len(tokenizer.encode(answer.value)) + 1 + follow_ups
        assert used <= window, (used, window)


def test_every_arm_composes_with_its_context_view_and_window(make_cfg):
    views = {}
    for arm in ARMS:
        cfg = make_cfg("experiment=longdoc_bpe_cpu", f"longdoc_arm={arm}")
        views[arm] = (cfg.context.name, cfg.data.view, cfg.max_length, cfg.model.text_position_unit)
    assert views == {
        "vision": ("vision", "vision", 128, "token"),
        "truncate": ("truncate", "text", 128, "token"),
        "text_meanpool": ("text_meanpool", "pages_as_text", 128, "token"),
        "text_conv": ("text_conv", "pages_as_text", 128, "token"),
        "full_text": ("full_text", "text", 640, "token"),
    }
    assert make_cfg("experiment=longdoc_cpu").data.view == "both"  # the old recipe keeps both views
    # not an arm: the text pretraining every arm may start from (init_from), whole short documents as text
    pre = make_cfg("experiment=longdoc_bpe_cpu", "longdoc_arm=text_pretraining")
    assert (pre.context.name, pre.data.view, pre.data.follow_ups, pre.loss.prompt_lm_weight) == (
        "truncate",
        "text",
        True,
        1.0,
    )


# -------------------------------------------------------------------------- text arms over several pages
def test_each_page_text_fills_its_own_k_positions_in_a_batch(make_cfg):
    """Rows of context_ids: one per <image>, sample after sample; each row's vectors land in its own
    page's K placeholders, so a batch of a one-page and a three-page sample gives each sample's logits
    alone."""
    module, proc = text_arm(make_cfg, "text_meanpool")
    model, tokenizer = module.model.eval(), module.model.tokenizer
    K = model.vision_tokens_per_image
    one = proc(raw("one", f"{IMAGE_TOKEN}\nQ?", "a single page"))  # a string: one <image>
    three = proc(raw("three", IMAGE_TOKEN * 3 + "\nQ?", PAGES))
    assert three["context_lengths"] == [len(tokenizer.encode(p)) for p in PAGES]
    batch = Collator(tokenizer.pad_id)([one, three])
    rows = [
        ids[mask.bool()].tolist()
        for ids, mask in zip(batch["context_ids"], batch["context_mask"], strict=True)
    ]
    assert rows == [tokenizer.encode(t) for t in ["a single page", *PAGES]]
    assert (batch["input_ids"] == tokenizer.image_token_id).sum(1).tolist() == [K, 3 * K]
    with torch.no_grad():
        vectors = model.encode(**context_inputs(batch)).vectors  # (4 rows, K, D)
        embeds = model.embed_inputs(batch["input_ids"], vision=vectors)
        slots = (batch["input_ids"][1] == tokenizer.image_token_id).nonzero().flatten()
        for page in range(3):  # page p of the second sample: its K positions hold row 1 + p
            assert torch.equal(
                embeds[1, slots[page * K : (page + 1) * K]], vectors[1 + page].to(embeds.dtype)
            )
        together = model(batch["input_ids"], attention_mask=batch["attention_mask"], vision=vectors).logits
        for row, sample in enumerate([one, three]):
            alone = Collator(tokenizer.pad_id)([sample])
            logits = model(
                alone["input_ids"], attention_mask=alone["attention_mask"], **context_inputs(alone)
            ).logits
            assert torch.allclose(together[row, : alone["input_ids"].shape[1]], logits[0], atol=1e-5)
    # the chunk loss reads each row's own text; generation (left padding) takes the same rows
    reading = module.context_reading(batch, vectors)
    assert [t.tolist() for t in reading["image_text_ids"]] == rows and len(reading["pixel_values"]) == 4
    assert set(module.loss(batch)[1]) == {"lm", "chunk"}
    assert len(module.predict_text(batch, max_new_tokens=2)) == 2


@pytest.mark.parametrize("context", ["truncate", "full_text"])
def test_in_prompt_arms_put_each_page_ids_in_its_own_place(make_cfg, context):
    _, proc = text_arm(make_cfg, context)
    tokenizer, K = proc.tokenizer, proc.vision_tokens_per_image
    sample = proc(raw("three", IMAGE_TOKEN * 3 + "\nQ?", PAGES))
    pages = [tokenizer.encode(p) for p in PAGES]
    if context == "truncate":  # each page cut or padded to K
        pages = [ids[:K] + [tokenizer.pad_id] * (K - len(ids)) for ids in pages]
    expected = [tokenizer.bos_id, *(i for ids in pages for i in ids), *tokenizer.encode("\nQ?")]
    assert list(sample["prompt_ids"]) == expected and "context_ids" not in sample


@pytest.mark.parametrize("context", ["text_meanpool", "truncate"])
def test_a_count_of_texts_other_than_the_images_is_a_named_bad_sample(make_cfg, context):
    _, proc = text_arm(make_cfg, context)
    with pytest.raises(Skip, match=r"'doc-7': malformed_record .*2 context text\(s\) for 3 <image>") as error:
        proc(raw("doc-7", IMAGE_TOKEN * 3 + "\nQ?", PAGES[:2]))
    assert error.value.reason == "malformed_record"
    with pytest.raises(Skip, match=r"1 context text\(s\) for 3 <image>"):
        proc(raw("doc-8", IMAGE_TOKEN * 3 + "\nQ?", "one string"))
    with pytest.raises(Skip, match=r"'doc-9': empty_text \(the context texts \[1\] are empty\)"):
        proc(raw("doc-9", IMAGE_TOKEN * 2 + "\nQ?", ["a page", ""]))


# ------------------------------------------------------------------------------------------- the views
def test_pages_as_text_gives_each_page_text_and_text_view_no_context(tmp_path, make_cfg):
    source = small_longdoc(tmp_path)
    shard = next(read_shards(source.prepare()["val"]))
    meta = json.loads(shard["json"])["meta"]
    _, meanpool = text_arm(make_cfg, "text_meanpool")
    sample = LongDocView(meanpool, "pages_as_text", source.values())(shard)
    K, tokenizer = meanpool.vision_tokens_per_image, meanpool.tokenizer
    assert sample["view"] == "pages_as_text" and meta["pages"] >= 3
    assert sample["prompt_ids"].count(tokenizer.image_token_id) == K * meta["pages"]
    assert sample["context_lengths"] == [len(tokenizer.encode(p)) for p in page_texts(meta)]
    assert sample["context_ids"] == [i for p in page_texts(meta) for i in tokenizer.encode(p)]
    _, truncate = text_arm(make_cfg, "truncate")
    text = LongDocView(truncate, "text", source.values())(shard)
    assert tokenizer.image_token_id not in text["prompt_ids"] and "context_ids" not in text
    assert tokenizer.decode(list(text["prompt_ids"])).endswith(meta["question"])


def test_a_view_the_context_arm_does_not_read_fails_at_start_up_naming_both(tmp_path, make_cfg):
    from vlm.training.builders import build_datamodule

    source = small_longdoc(tmp_path)
    _, meanpool = text_arm(make_cfg, "text_meanpool")
    with pytest.raises(
        ValueError, match=r"data\.view=vision does not go with context=text_meanpool.*pages_as_text"
    ):
        LongDocView(meanpool, "vision", source.values())
    vision = SampleProcessor(ByteTokenizer(), ImagePreprocessing(size=(32, 512)), 8)
    with pytest.raises(ValueError, match=r"data\.view=pages_as_text does not go with context=vision"):
        LongDocView(vision, "pages_as_text", source.values())
    # the run's datamodule (built by Hydra, which wraps the error): the arm's view with another context
    # chosen on the command line
    cfg = make_cfg("experiment=longdoc_bpe_cpu", "longdoc_arm=vision", "context=text_conv")
    module = VLMModule(cfg)
    with pytest.raises(InstantiationException, match=r"data\.view=vision does not go with context=text_conv"):
        build_datamodule(cfg.data, module.model, cfg.max_length)
    # and the benchmark: a view this checkpoint's arm cannot read
    benchmark = LongDocBenchmark(views=["vision"])
    with pytest.raises(ValueError, match=r"benchmark.views has vision.*model has context=truncate"):
        benchmark.shown_views(Context(model=SimpleNamespace(context="truncate")))
    with pytest.raises(ValueError, match=r"benchmark.ocr_engine=tesseract\|rapidocr"):
        LongDocBenchmark(views=["ocr_text"])
    with pytest.raises(ValueError, match=r"benchmark.ocr_engine='easyocr'"):
        LongDocBenchmark(ocr_engine="easyocr")


# ----------------------------------------------------------------------------------- OCR, then truncate
class FakeEngine:
    """Reads every page as the same statement, taking 5 ms a page."""

    version, settings, reading = "fake 1.0", "none", "The code of Alder is 1234.\n"

    def __init__(self) -> None:
        self.pages = 0

    def read(self, image) -> str:
        self.pages += 1
        time.sleep(0.005)
        return self.reading


def ocr_context(window: int = 64) -> Context:
    return Context(
        tokenizer=ByteTokenizer(), vision_tokens_per_image=8, image_size=(32, 512), max_length=window
    )


def test_the_ocr_view_replaces_the_document_by_the_engine_reading_then_truncates(monkeypatch):
    engine = FakeEngine()
    monkeypatch.setattr("vlm.eval.ocr_engines.build_engine", lambda name, psm=7, lang="eng": engine)
    benchmark = LongDocBenchmark(
        lengths=[200],
        samples_per_length=2,
        views=["ocr_text"],
        ocr_engine="tesseract",
        tokenizers=["bytes"],
        source=ONE_FONT,
    )
    items = benchmark.items(ocr_context())
    values = benchmark.recipe(ocr_context()).values()
    assert len(items) == 2 and engine.pages == sum(i.meta["pages"] for i in items)
    reading = ocr_document([FakeEngine.reading] * items[0].meta["pages"])
    assert reading.startswith("The code of Alder is 1234. The code of Alder")  # lines joined by spaces
    for item in items:
        kept = item.prompt.split("\n")[0]
        assert reading.startswith(kept) and len(kept) < len(reading)  # the engine's text, its end cut
        assert item.meta["ocr_cer"] > 0.5 and item.meta["kept_share"] < 1
        assert len(ByteTokenizer().encode(item.prompt)) + 1 <= 64 - answer_slot(ByteTokenizer(), values)
    answers = {item.key: item.answers[0] if i == 0 else "0" for i, item in enumerate(items)}
    result = benchmark.score(items, answers, ocr_context())
    ocr = result.metrics["ocr_text"]
    assert ocr["exact_match"] == 0.5 and ocr["ocr_engine"] == "tesseract"
    assert ocr["ocr_ms_per_page"] >= 5 and ocr["ocr_seconds_per_question"] > 0
    assert result.tables["curve"][0]["ocr_text_ocr_ms_per_page"] >= 5


def test_an_engine_that_is_not_installed_says_how_to_install_it(monkeypatch):
    from vlm.eval.ocr_engines import EngineUnavailable

    monkeypatch.setattr("vlm.eval.ocr_engines.shutil.which", lambda name: None)
    benchmark = LongDocBenchmark(
        lengths=[200], samples_per_length=1, views=["ocr_text"], ocr_engine="tesseract"
    )
    with pytest.raises(EngineUnavailable, match="apt-get install tesseract-ocr"):
        benchmark.items(ocr_context())


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param(name, marks=pytest.mark.skipif(bool(why), reason=str(why)))
        for name, why in OCR_ENGINES_MISSING.items()
    ],
)
def test_a_real_engine_reads_the_pages_nearly_right(engine):
    benchmark = LongDocBenchmark(
        lengths=[150],
        samples_per_length=1,
        views=["ocr_text"],
        ocr_engine=engine,
        tokenizers=["bytes"],
        source=ONE_FONT,
    )
    (item,) = benchmark.items(ocr_context(window=512))
    assert item.meta["ocr_cer"] < 0.1 and item.meta["ocr_seconds"] > 0
    assert item.meta["kept_share"] == 1.0  # 150 characters fit a 512-byte window whole


# ------------------------------------------------------------------------------------------- the table
def write_run(
    run_dir: Path, view: str, scores: dict[int, list[float]], costs: dict, overrides: list[str], **metrics
) -> None:
    """A benchmark=longdoc result as eval writes it: samples (exact match per question, anls = half of
    it + 0.25) and a curve point per length with `costs` under the view's prefix."""
    eval_dir = run_dir / "eval" if overrides else run_dir
    eval_dir.mkdir(parents=True)
    if overrides:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    samples = [
        {"view": view, "length": length, "exact_match": em, "anls": em / 2 + 0.25}
        for length, ems in scores.items()
        for em in ems
    ]
    (eval_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    curve = [
        {"length": length, "text_tokens": length / 3, **{f"{view}_{k}": v for k, v in costs.items()}}
        for length in scores
    ]
    (eval_dir / "tables.json").write_text(json.dumps({"curve": curve}))
    base = {"benchmark": "longdoc", "views": [view], "max_length": 128, "text_window_tokens": 110}
    (eval_dir / "metrics.json").write_text(json.dumps(base | metrics))


def test_the_table_pools_seeds_per_arm_and_length(tmp_path):
    sweep = tmp_path / "multirun"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    cost = {"positions": 110, "context_positions": 96, "flops_per_question": 2e9, "ms_per_question": 10.0}
    write_run(sweep / "0", "vision", {150: [1, 1, 1, 0], 900: [1, 0]}, cost, ["longdoc_arm=vision", "seed=0"])
    slower = cost | {"ms_per_question": 30.0, "compression_llm_bpe1024": 3.0}
    write_run(sweep / "1", "vision", {150: [0, 0], 900: [1, 1]}, slower, ["longdoc_arm=vision", "seed=1"])
    write_run(sweep / "2", "text", {150: [1, 1], 900: [0, 0]}, cost, ["longdoc_arm=truncate", "seed=0"])
    (sweep / "3" / ".hydra").mkdir(parents=True)  # a job that failed before its eval
    ocr = {"ocr_ms_per_page": 40.0, "ms_per_question": 500.0}
    write_run(tmp_path / "ocr_run", "ocr_text", {150: [1, 0]}, ocr, [], ocr_text={"ocr_engine": "tesseract"})
    rows = write_table([str(sweep), str(tmp_path / "ocr_run")], tmp_path / "out")
    by = {(r["arm"], r["length"]): r for r in rows}
    assert list(dict.fromkeys(r["arm"] for r in rows)) == ["vision", "truncate", "ocr_tesseract"]
    short = by[("vision", 150)]
    assert short["seeds"] == 2 and short["questions"] == 6
    assert short["exact_match"] == pytest.approx((0.75 + 0.0) / 2)  # the mean of the seeds' means, not 3/6
    assert short["anls"] == pytest.approx(((0.75 / 2 + 0.25) + 0.25) / 2)
    assert (
        short["exact_match_low"] <= wilson_interval(3, 6)[0]
        and short["exact_match_high"] >= wilson_interval(3, 6)[1]
    )
    assert short["ms_per_question"] == 20.0 and short["gflops_per_question"] == 2.0  # means over seeds
    assert short["compression_llm_bpe1024"] == 3.0 and short["doc_tokens"] == 50  # where a seed has it
    assert by[("truncate", 900)]["exact_match"] == 0 and by[("truncate", 900)]["seeds"] == 1
    assert by[("ocr_tesseract", 150)]["ocr_ms_per_page"] == 40.0
    table = (tmp_path / "out" / "longdoc_arms.md").read_text()
    assert "| vision | 150 | 50 | 2 | 6 | 0.375 [" in table
    assert "3: no metrics.json" in table and "- vision: 128; 110" in table
    written = json.loads((tmp_path / "out" / "longdoc_arms.json").read_text())
    assert len(written["rows"]) == len(rows) and written["windows"]["vision"]["max_length"] == 128
    assert (tmp_path / "out" / "longdoc_arms.png").stat().st_size > 1000


def test_the_two_level_interval_counts_the_spread_between_seeds():
    # each seed always right or always wrong: resampling questions alone would give a point
    low, high = two_level_interval([[1, 1, 1], [0, 0, 0]])
    assert (low, high) == (0.0, 1.0)
    assert two_level_interval([[0.5, 0.5], [0.5]]) == (0.5, 0.5)
    low, high = two_level_interval([[1, 0, 1, 0, 1, 1]])
    assert low < 4 / 6 < high and (low, high) == two_level_interval([[1, 0, 1, 0, 1, 1]])


# ------------------------------------------------------------------------ every arm, trained and scored
def test_the_text_meanpool_arm_trains_on_pages_and_is_scored_on_them(make_cfg, tmp_path):
    """The new path end to end in-process: pages_as_text samples, one row per page, the benchmark's
    pages_as_text view with its costs."""
    from vlm.app.run import train

    metrics = train(make_cfg(*arm_overrides(tmp_path, "text_meanpool")))
    assert 0 < metrics["train/loss_chunk"] < float("inf")
    result = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert result["views"] == ["pages_as_text"] and result["context"] == "text_meanpool"
    view = result["pages_as_text"]
    assert view["questions"] == 4 and view["flops_per_question"] > 0 and view["ms_per_question"] > 0
    assert view["mean_context_positions"] % 8 == 0  # K = 8 per page


def arm_overrides(tmp_path: Path, arm: str | None = None) -> list[str]:
    """experiment=longdoc_bpe_cpu at test size: tiny parts, a few dozen short documents, two steps."""
    return [
        "experiment=longdoc_bpe_cpu",
        *([f"longdoc_arm={arm}"] if arm else []),
        "data.source.max_chars=300",
        "data.source.num_train=24",
        "data.source.num_val=4",
        "data.source.num_test=4",
        "data.source.samples_per_shard=12",
        "data.source.workers=1",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "data.val_samples=4",
        "data.shuffle_buffer=8",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false",
        "benchmark.lengths=[150,300]",
        "benchmark.samples_per_length=2",
    ]


@pytest.mark.slow
def test_a_sweep_of_every_arm_through_the_cli_then_the_table(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "train.py",
        "-m",
        *arm_overrides(tmp_path),
        "sizes=tiny",
        f"longdoc_arm={','.join(ARMS)}",
        "logger=csv",
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={sweep}",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, arm in enumerate(ARMS):
        metrics = json.loads((sweep / str(job) / "eval" / "metrics.json").read_text())
        assert metrics["context"] == arm, (job, arm)
    table_main([str(sweep), "--out", str(tmp_path / "table")])
    rows = json.loads((tmp_path / "table" / "longdoc_arms.json").read_text())["rows"]
    assert [r["arm"] for r in rows] == [arm for arm in ARMS for _ in (150, 300)]
    by = {(r["arm"], r["length"]): r for r in rows}
    for length in (150, 300):  # the arms over pages take the same positions; full_text all its tokens
        assert (
            by[("vision", length)]["context_positions"] == by[("text_meanpool", length)]["context_positions"]
        )
        assert by[("full_text", length)]["compression_llm_bpe1024"] == pytest.approx(1.0, abs=0.02)
        assert all(by[(arm, length)]["questions"] == 2 for arm in ARMS)
    assert "exact_match" in (tmp_path / "table" / "longdoc_arms.md").read_text()
