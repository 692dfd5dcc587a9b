"""`benchmark=longdoc`: question answering on long documents, shown to the model in one or more views.

Documents come from `vlm.data.longdoc.LongDoc` (the checkpoint's own `data=longdoc` recipe, else its
defaults at the encoder's input size; `benchmark.source` overrides either), `samples_per_length` for
each length in `lengths` (characters), from the test split of the corpus. The same checkpoint answers
each document in each of `views`:

- `vision`: its pages, one `<image>` each (only where the pages, the question and the answer fit in the
  run's `max_length`);
- `text`: its text, the end cut so that it fits the window, as in training (where the whole text fits,
  this is the full-text upper bound);
- `pages_as_text`: the vision prompt with each page's text in place of its image, for the text context
  arms (`text_meanpool`, `text_conv`) that compress each page into its K positions (shown where the
  pages fit, as `vision`);
- `ocr_text`: the pages read by an OCR engine (`ocr_engine`: `vlm.eval.ocr_engines`' Tesseract or
  RapidOCR), the page texts joined in place of the document, then cut as `text`; the engine's time per
  page is recorded. Scored with a checkpoint that reads the text view (the truncate arm).

`views: null` takes the view the checkpoint was trained on (`data.view`; `both`: vision and text). Each
view must be one the model's context arm reads (`vlm.data.longdoc.VIEW_CONTEXTS`; `ocr_text` as `text`).

Reported per length and view: exact match and ANLS, the LLM positions the prompt takes (`positions`) and
those the document takes (`context_positions`: pages x K, or the kept text's tokens), the document's counts
under each tokenizer (`vlm.text_accounting`) and their ratio to the document's positions
(`chars_per_vision_token`, `compression_<tokenizer>`: for a text view, positions stand in for vision
tokens; a cut text counts the whole document's tokens), milliseconds per question (one batched greedy
generation of up to `batch_size` of the length's questions, timed around the model alone, after a warm-up
pass; for `ocr_text` plus the engine's reading of the pages) and FLOPs per question (one forward over
the prompt and the reference answer, the encoder or compressor included: what prefill and cached
decoding of the answer compute, attention counted in full; on the first `flops_items` questions). Both
need the model and are left out when scoring given predictions or when the model is spread over ranks.
Overall: the same per view, `seconds_per_question` (the runner's wall time of the view's generation
pass, loading included) and the split at the text window (documents that fit as text / those that do
not). The plot marks the text window: the document tokens the LLM can take as text.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from vlm.contracts import ImagePreprocessing, context_inputs
from vlm.data.longdoc import FACT, VIEW_CONTEXTS, LongDoc, answer_slot, page_texts, text_prompt
from vlm.data.processing import Collator, SampleProcessor, to_device
from vlm.eval.anls import anls_score
from vlm.eval.benchmarks.base import Benchmark, Context, Item, Result, empty_for_missing, mean
from vlm.metrics import cer
from vlm.text_accounting import TextAccounting, llm_tokenizer_name

log = logging.getLogger(__name__)
VIEWS = ("vision", "text", "pages_as_text", "ocr_text")
PAGED = ("vision", "pages_as_text")  # views that take the pages' positions: shown where they fit
DATA_VIEW = {"vision": "vision", "text": "text", "pages_as_text": "pages_as_text", "ocr_text": "text"}
OCR_ENGINES = ("tesseract", "rapidocr")


def views_of(data_view: str | None) -> list[str]:
    """The benchmark views of a checkpoint trained on `data.view` (None: not on longdoc data)."""
    if data_view in (None, "both"):
        return ["vision", "text"]
    return [data_view]


def ocr_document(page_texts: list[str]) -> str:
    """An OCR engine's page texts as one document: each page's lines and spaces collapsed to single
    spaces (a longdoc page is one wrapped paragraph), the pages joined by spaces as `paginate` cuts them."""
    return " ".join(" ".join(text.split()) for text in page_texts).strip()


@dataclass
class LongDocBenchmark(Benchmark):
    name: str = "longdoc"
    lengths: list[int] = field(default_factory=lambda: [100, 250, 500, 750, 1000])
    samples_per_length: int = 32
    views: list[str] | None = None  # None: the checkpoint's data view (`views_of`)
    split: str = "test"
    source: dict = field(default_factory=dict)  # LongDoc fields over the run's recipe (or its defaults)
    batch_size: int = 32
    max_new_tokens: int = 8
    ocr_engine: str | None = None  # view ocr_text: tesseract or rapidocr
    ocr_psm: int = 7  # Tesseract's page segmentation: 7 one line (the recipes' 32-px pages), 6 a block
    flops_items: int = 2  # questions per view and length whose FLOPs are counted

    def __post_init__(self) -> None:
        if self.views is not None:
            self.views = list(self.views)
            unknown = sorted(set(self.views) - set(VIEWS))
            if unknown or not self.views:
                raise ValueError(f"benchmark.views={self.views}: expected some of {', '.join(VIEWS)}")
        if self.ocr_engine is not None and self.ocr_engine not in OCR_ENGINES:
            raise ValueError(
                f"benchmark.ocr_engine={self.ocr_engine!r}: expected one of {', '.join(OCR_ENGINES)} or null"
            )
        if self.views is not None and "ocr_text" in self.views and self.ocr_engine is None:
            raise ValueError(
                "benchmark.views has ocr_text: choose the engine that reads the pages, "
                f"benchmark.ocr_engine={'|'.join(OCR_ENGINES)}"
            )

    def recipe(self, context: Context) -> LongDoc:
        """The documents' recipe: the run's LongDoc source, else LongDoc at the encoder's input size."""
        source = getattr(context.datamodule, "source", None)
        if not isinstance(source, LongDoc):
            source = LongDoc(image_size=context.image_size)
        return dataclasses.replace(source, **dict(self.source))

    def shown_views(self, context: Context) -> list[str]:
        """`views`, or the checkpoint's data view; each checked against the model's context arm."""
        views = self.views or views_of(getattr(context.datamodule, "view", None))
        arm = getattr(context.model, "context", None)
        for view in views:
            readers = VIEW_CONTEXTS[DATA_VIEW[view]]
            if arm is not None and arm not in readers:
                raise ValueError(
                    f"benchmark.views has {view}, which context={'|'.join(readers)} reads; this checkpoint's "
                    f"model has context={arm} (views it reads: "
                    f"{', '.join(v for v in VIEWS if arm in VIEW_CONTEXTS[DATA_VIEW[v]])})"
                )
        return views

    def items(self, context: Context | None = None) -> list[Item]:
        if context is None or context.tokenizer is None or context.max_length is None:
            raise ValueError(
                "benchmark=longdoc needs ckpt_path=...: the model's tokenizer, vision tokens and window "
                "(max_length) decide what each view shows"
            )
        views = self.shown_views(context)
        engine = self.build_engine() if "ocr_text" in views else None
        recipe = self.recipe(context)
        tokenizer, window = context.tokenizer, context.max_length
        vision_tokens = context.vision_tokens_per_image
        processor = SampleProcessor(
            tokenizer, ImagePreprocessing(size=context.image_size), vision_tokens, window
        )
        budget = window - answer_slot(tokenizer, recipe.values())

        def encode(prompt: str) -> list[int]:
            return processor.encode_prompt(prompt, 0)

        accounting = self.accounting(context)
        fonts = recipe.available_fonts()
        items: list[Item] = []
        self.unrendered: dict[int, int] = {}
        for length in self.lengths:
            for i in range(self.samples_per_length):
                sample = recipe.sample(self.split, f"len{length:06d}-{i:04d}", fonts, length=length)
                if sample is None:  # a word wider than the page
                    self.unrendered[length] = self.unrendered.get(length, 0) + 1
                    continue
                meta = sample["meta"]
                document, question = meta["document"], meta["question"]
                question_positions = len(encode(text_prompt("", question, encode, budget)[0]))
                prompt, kept = text_prompt(document, question, encode, budget)
                pages = meta["pages"]
                vision_prompt_tokens = len(processor.encode_prompt(sample["prompt"], pages))
                common = {
                    "length": length,
                    **accounting.count(document),
                    "text_tokens": len(tokenizer.encode(document)),
                    "text_window_tokens": budget - question_positions,
                    "fits_as_text": kept == len(document),
                    "pages": pages,
                    "vision_tokens": pages * vision_tokens,
                    "vision_fits": vision_prompt_tokens <= budget,
                    "answer_page": meta["answer_page"],
                }
                paged = {"positions": vision_prompt_tokens, "context_positions": pages * vision_tokens}
                base, answers = sample["key"], sample["answers"]
                answer_end = meta["answer_start"] + len(answers[0])
                for view in views:
                    if view == "vision":
                        items.append(
                            Item(
                                f"{base}/vision",
                                sample["images"],
                                sample["prompt"],
                                answers,
                                {"view": view, **common, **paged},
                            )
                        )
                    elif view == "pages_as_text":
                        shown = {"view": view, **common, **paged, "context_text": page_texts(meta)}
                        items.append(Item(f"{base}/{view}", None, sample["prompt"], answers, shown))
                    elif view == "text":
                        positions = len(encode(prompt))
                        shown = {
                            "view": view,
                            **common,
                            "positions": positions,
                            "context_positions": positions - question_positions,
                            "kept_share": kept / len(document),
                            "answer_kept": kept >= answer_end,
                            "context_text": [],
                        }
                        items.append(Item(f"{base}/{view}", None, prompt, answers, shown))
                    else:
                        items.append(
                            self.ocr_item(engine, sample, common, encode, budget, question_positions)
                        )
        return self.limited(items)

    def build_engine(self):
        """The OCR engine of `ocr_engine` (`vlm.eval.ocr_engines`; EngineUnavailable says how to install it)."""
        from vlm.eval.ocr_engines import build_engine

        engine = build_engine(self.ocr_engine, psm=self.ocr_psm)
        self.engine_version, self.engine_settings = engine.version, engine.settings
        return engine

    def ocr_item(
        self, engine, sample: dict, common: dict, encode, budget: int, question_positions: int
    ) -> Item:
        """The `ocr_text` view of a document: its pages read by `engine` (timed), joined, then cut as the
        text view is."""
        meta, answers = sample["meta"], sample["answers"]
        fact = meta["facts"][meta["asked"]]
        asked = FACT.format(name=fact["name"], value=fact["value"])
        texts, seconds = [], 0.0
        for page in sample["images"]:
            image = Image.open(io.BytesIO(page))
            image.load()
            start = time.perf_counter()
            texts.append(engine.read(image))
            seconds += time.perf_counter() - start
        document = ocr_document(texts)
        prompt, kept = text_prompt(document, meta["question"], encode, budget)
        positions = len(encode(prompt))
        shown = {
            "view": "ocr_text",
            **common,
            "positions": positions,
            "context_positions": positions - question_positions,
            "ocr_chars": len(document),
            "ocr_cer": cer(document, meta["document"]),
            "ocr_seconds": seconds,
            "kept_share": kept / len(document) if document else 0.0,
            "answer_kept": asked in document[:kept],  # the asked statement, read right, in what the LLM sees
            "context_text": [],
        }
        return Item(f"{sample['key']}/ocr_text", None, prompt, answers, shown)

    def generation_groups(self, items: list[Item]) -> dict[str, list[Item]]:
        """One timed pass per view; pages that do not fit in the window are not shown to the model."""
        groups: dict[str, list[Item]] = {}
        for item in items:
            if item.meta["view"] not in PAGED or item.meta["vision_fits"]:
                groups.setdefault(item.meta["view"], []).append(item)
        return groups

    def score(self, items: list[Item], predictions: dict[str, str], context: Context) -> Result:
        views = list(dict.fromkeys(i.meta["view"] for i in items))
        shown = [i for i in items if i.meta["view"] not in PAGED or i.meta["vision_fits"]]
        predictions, notes = empty_for_missing(shown, predictions, "questions")
        unfit = [i for i in items if i.meta["view"] in PAGED and not i.meta["vision_fits"]]
        if unfit:
            lengths = sorted({i.meta["length"] for i in unfit})
            notes.append(
                f"{len(unfit)} documents (lengths {lengths} characters) have more pages than fit in the "
                f"window of {context.max_length} tokens: no {' or '.join(sorted({i.meta['view'] for i in unfit}))} answer"
            )
        if getattr(self, "unrendered", None):
            notes.append(
                f"documents with a word wider than the page, left out (per length): {self.unrendered}"
            )
        samples = []
        for item in shown:
            prediction = predictions[item.key].strip()
            meta = {k: v for k, v in item.meta.items() if k != "context_text"}
            samples.append(
                {
                    "key": item.key,
                    **meta,
                    "prediction": prediction,
                    "answer": item.answers[0],
                    "exact_match": float(prediction in item.answers),
                    "anls": anls_score(prediction, item.answers),
                }
            )
        accounting = self.accounting(context)
        costs = self.measure_costs(context.model, shown)
        lengths = list(dict.fromkeys(i.meta["length"] for i in items))
        curve = [self._point(length, views, samples, items, accounting, costs) for length in lengths]
        window = mean(i.meta["text_window_tokens"] for i in items)
        metrics: dict = {
            "questions": len(shown),
            "max_length": context.max_length,
            "text_window_tokens": window,
            "vision_tokens_per_image": context.vision_tokens_per_image,
            "context": getattr(context.model, "context", None),
            "views": views,
        }
        for view in views:
            rows = [r for r in samples if r["view"] == view]
            seconds = context.generation_seconds.get(view)
            measured = [cost for (shown_view, _), cost in costs.items() if shown_view == view]
            metrics[view] = {
                "questions": len(rows),
                "exact_match": mean(r["exact_match"] for r in rows),
                "anls": mean(r["anls"] for r in rows),
                "seconds_per_question": seconds / len(rows) if seconds is not None and rows else None,
                "ms_per_question": mean(c["ms"] for c in measured) if measured else None,
                "flops_per_question": mean(c["flops"] for c in measured) if measured else None,
                "mean_positions": mean(r["positions"] for r in rows),
                "mean_context_positions": mean(r["context_positions"] for r in rows),
            }
            for where, fits in (("within_window", True), ("beyond_window", False)):
                inside = [r for r in rows if r["fits_as_text"] == fits]
                metrics[where] = metrics.get(where, {}) | {
                    f"{view}_exact_match": mean(r["exact_match"] for r in inside),
                    f"{view}_anls": mean(r["anls"] for r in inside),
                    f"{view}_questions": len(inside),
                }
            if rows:  # each document's ratios to the positions it takes, averaged over the documents
                ratios = [
                    accounting.ratios(r, r["context_positions"]) for r in rows if r["context_positions"]
                ]
                metrics[view] |= {key: mean(r[key] for r in ratios) for key in ratios[0]} if ratios else {}
            if view == "ocr_text":
                metrics[view] |= self._ocr_metrics(rows)
        if metrics.get("vision", {}).get("questions"):
            metrics["vision"]["mean_vision_tokens"] = mean(
                r["vision_tokens"] for r in samples if r["view"] == "vision"
            )
        x_label = f"document length ({llm_tokenizer_name(context.tokenizer)} tokens)"
        plot = accuracy_plot(curve, views, window, context.max_length, x_label)
        plots = {"accuracy_vs_length": plot}
        return Result(metrics, samples, {"curve": curve}, plots, notes)

    def _ocr_metrics(self, rows: list[dict]) -> dict:
        pages = sum(r["pages"] for r in rows)
        seconds = sum(r["ocr_seconds"] for r in rows)
        return {
            "ocr_engine": self.ocr_engine,
            "ocr_engine_version": getattr(self, "engine_version", None),
            "ocr_engine_settings": getattr(self, "engine_settings", None),
            "ocr_ms_per_page": 1000 * seconds / pages if pages else None,
            "ocr_seconds_per_question": seconds / len(rows) if rows else None,
            "ocr_cer": mean(r["ocr_cer"] for r in rows),
        }

    def measure_costs(self, model, shown: list[Item]) -> dict[tuple[str, int], dict[str, float]]:
        """{(view, length): {"ms", "flops"} per question} (see the module doc): ms from one batched greedy
        generation of up to `batch_size` of the group's questions (the engine's reading time added for
        ocr_text), FLOPs counted on the first `flops_items`. Empty without the model, or when it is spread
        over ranks (one rank's forward of a sharded model would wait for the others)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if model is None or (distributed and torch.distributed.get_world_size() > 1):
            return {}
        processor = SampleProcessor.for_model(model, train=False)
        groups: dict[tuple[str, int], list[Item]] = {}
        for item in shown:
            groups.setdefault((item.meta["view"], item.meta["length"]), []).append(item)
        costs = {}
        training = model.training
        model.eval()
        if groups:  # the first pass pays for warming up (allocator, kernels): not counted
            generation_seconds(model, processor, next(iter(groups.values()))[:1], self.max_new_tokens)
        for key, group in groups.items():
            timed = group[: self.batch_size]
            seconds = generation_seconds(model, processor, timed, self.max_new_tokens)
            flops = [question_flops(model, processor, item) for item in group[: max(1, self.flops_items)]]
            flops = [value for value in flops if value is not None]
            if seconds is None or not flops:
                continue
            ocr = sum(item.meta.get("ocr_seconds", 0.0) for item in timed)
            costs[key] = {"ms": 1000 * (seconds + ocr) / len(timed), "flops": statistics.fmean(flops)}
        model.train(training)
        return costs

    def _point(
        self,
        length: int,
        views: list[str],
        samples: list[dict],
        items: list[Item],
        accounting: TextAccounting,
        costs: dict,
    ) -> dict:
        """One length's row of the curve: sizes, then each view's scores and costs (None where nothing was
        shown)."""
        documents = [i.meta for i in items if i.meta["length"] == length and i.meta["view"] == views[0]]
        point = {
            "length": length,
            "documents": len(documents),
            "text_tokens": mean(m["text_tokens"] for m in documents),
            **{key: mean(m[key] for m in documents) for key in accounting.count_keys},
            "pages": mean(m["pages"] for m in documents),
            "vision_tokens": mean(m["vision_tokens"] for m in documents),
        }
        if point["vision_tokens"]:
            point |= accounting.ratios(point, point["vision_tokens"])
        point["fits_as_text"] = mean(float(m["fits_as_text"]) for m in documents)
        rows = [r for r in samples if r["length"] == length]
        for view in views:
            shown = [r for r in rows if r["view"] == view]
            cost = costs.get((view, length), {})
            point[f"{view}_questions"] = len(shown)
            point[f"{view}_exact_match"] = mean(r["exact_match"] for r in shown) if shown else None
            point[f"{view}_anls"] = mean(r["anls"] for r in shown) if shown else None
            point[f"{view}_ms_per_question"] = cost.get("ms")
            point[f"{view}_flops_per_question"] = cost.get("flops")
            point[f"{view}_positions"] = mean(r["positions"] for r in shown) if shown else None
            positions = mean(r["context_positions"] for r in shown) if shown else None
            point[f"{view}_context_positions"] = positions
            if positions:
                counts = {key: mean(r[key] for r in shown) for key in accounting.count_keys}
                point |= {
                    f"{view}_{key}": value for key, value in accounting.ratios(counts, positions).items()
                }
            if view == "ocr_text" and shown:
                pages = sum(r["pages"] for r in shown)
                point["ocr_text_ocr_ms_per_page"] = 1000 * sum(r["ocr_seconds"] for r in shown) / pages
                point["ocr_text_ocr_cer"] = mean(r["ocr_cer"] for r in shown)
        if "text" in views:
            text = [r for r in rows if r["view"] == "text"]
            point["text_kept_share"] = mean(r["kept_share"] for r in text) if text else None
            point["text_answer_kept"] = mean(float(r["answer_kept"]) for r in text) if text else None
            full = [r for r in text if r["fits_as_text"]]
            point["full_text_questions"] = len(full)
            point["full_text_exact_match"] = mean(r["exact_match"] for r in full) if full else None
            point["full_text_anls"] = mean(r["anls"] for r in full) if full else None
        return point


def question_batch(
    processor: SampleProcessor, items: list[Item], device, answers: bool = False
) -> dict | None:
    """The generation batch of `items` as the runner makes it (`GenerationSet`), on `device`; with
    `answers`, each reference answer and end-of-sequence after its prompt. None when an item cannot be
    processed."""
    from vlm.eval.runner import GenerationSet

    samples = [GenerationSet([item], processor)[0] for item in items]
    if any("error" in sample for sample in samples):
        return None
    tokenizer = processor.tokenizer
    if answers:
        for sample, item in zip(samples, items, strict=True):
            sample["answer_ids"] = [*tokenizer.encode(item.answers[0]), tokenizer.eos_id]
    batch = Collator(tokenizer.pad_id)(samples)
    return to_device(batch, device)  # tiled views too


@torch.no_grad()
def generation_seconds(
    model, processor: SampleProcessor, items: list[Item], max_new_tokens: int
) -> float | None:
    """Wall seconds of one batched greedy generation of `items` (under bf16 autocast on a GPU, as the gpu
    trainer runs); None when an item cannot be processed."""
    from vlm.generation import generate

    device = next(model.parameters()).device
    batch = question_batch(processor, items, device)
    if batch is None:
        return None
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.autocast(device.type, torch.bfloat16, enabled=on_gpu):
        generate(
            model,
            batch["prompt_ids"],
            batch["prompt_mask"],
            max_new_tokens=max_new_tokens,
            **context_inputs(batch),
        )
    if on_gpu:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def question_flops(model, processor: SampleProcessor, item: Item) -> int | None:
    """FLOPs of one forward of `model` over the item's prompt (its pages encoded, or its texts compressed)
    and its reference answer with end-of-sequence: what generating that answer computes with a KV cache,
    attention counted in full. None when the item cannot be processed."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlm.training.flops import CPU_ATTENTION

    batch = question_batch(processor, [item], next(model.parameters()).device, answers=True)
    if batch is None:
        return None
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        model(batch["input_ids"], **context_inputs(batch))
    return counter.get_total_flops()


def accuracy_plot(curve: list[dict], views: list[str], window: float, max_length: int, x_label: str):
    """A plot maker: exact match and ANLS against document text tokens, per view, the full-text upper
    bound where the document fits, the share of documents whose answer the text view kept (the most it
    can get right), and the text window marked."""

    def make(path: Path) -> None:
        import matplotlib.pyplot as plt

        lines = [(view, f"{view} view", marker) for view, marker in zip(views, "osDv", strict=False)]
        if "text" in views:
            lines.append(("full_text", "full text (fits the window)", "^"))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, metric, title in zip(axes, ("exact_match", "anls"), ("exact match", "ANLS"), strict=True):
            for name, label, marker in lines:
                points = [
                    (p["text_tokens"], p[f"{name}_{metric}"])
                    for p in curve
                    if p[f"{name}_{metric}"] is not None
                ]
                if points:
                    ax.plot(*zip(*points, strict=True), marker=marker, label=label)
            kept = [
                (p["text_tokens"], p["text_answer_kept"])
                for p in curve
                if p.get("text_answer_kept") is not None
            ]
            if kept:
                ax.plot(
                    *zip(*kept, strict=True), color="gray", linestyle=":", label="text view kept the answer"
                )
            ax.axvline(
                window,
                color="gray",
                linestyle="--",
                label=f"LLM window: {window:.0f} document tokens (max_length {max_length})",
            )
            ax.set_xlabel(x_label)
            ax.set_title(title)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("score")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    return make
