"""`benchmark=longdoc`: question answering on long documents, as pages (vision) and as text.

Documents come from `vlm.data.longdoc.LongDoc` (the checkpoint's own `data=longdoc` recipe, else its
defaults at the encoder's input size; `benchmark.source` overrides either), `samples_per_length` for
each length in `lengths` (characters), from the test split of the corpus. The same checkpoint answers
each document twice: from its pages (vision view; only where the pages, the question and the answer
fit in the run's `max_length`) and from its text (text view; the document's end cut so that it fits,
as in training). Where the whole text fits, the text view is the full-text upper bound.

Reported per length: exact match and ANLS of each view, the document's text tokens (the model's
tokenizer) and its counts under each tokenizer (`vlm.text_accounting`: characters, bytes, the model's
tokenizer and each of `tokenizers`), pages, vision tokens, characters per vision token and
`compression_<tokenizer>` (the document's tokens / its vision tokens), the share of the document the
text view kept and how often it kept the answer; overall, the same split at the text window (documents
that fit as text / documents that do not) and the wall time per question of each view's generation
pass. The plot marks the text window: the document tokens the LLM can take as text.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from vlm.data.longdoc import LongDoc, answer_slot, text_prompt
from vlm.data.processing import SampleProcessor
from vlm.eval.anls import anls_score
from vlm.eval.benchmarks.base import Benchmark, Context, Item, Result, empty_for_missing, mean
from vlm.models.encoders.base import ImagePreprocessing
from vlm.text_accounting import TextAccounting, llm_tokenizer_name

log = logging.getLogger(__name__)
VIEWS = ("vision", "text")


@dataclass
class LongDocBenchmark(Benchmark):
    name: str = "longdoc"
    lengths: list[int] = field(default_factory=lambda: [100, 250, 500, 750, 1000])
    samples_per_length: int = 32
    views: list[str] = field(default_factory=lambda: list(VIEWS))
    split: str = "test"
    source: dict = field(default_factory=dict)  # LongDoc fields over the run's recipe (or its defaults)
    batch_size: int = 32
    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        self.views = list(self.views)
        unknown = sorted(set(self.views) - set(VIEWS))
        if unknown or not self.views:
            raise ValueError(f"benchmark.views={self.views}: expected some of {', '.join(VIEWS)}")

    def recipe(self, context: Context) -> LongDoc:
        """The documents' recipe: the run's LongDoc source, else LongDoc at the encoder's input size."""
        source = getattr(context.datamodule, "source", None)
        if not isinstance(source, LongDoc):
            source = LongDoc(image_size=context.image_size)
        return dataclasses.replace(source, **dict(self.source))

    def items(self, context: Context | None = None) -> list[Item]:
        if context is None or context.tokenizer is None or context.max_length is None:
            raise ValueError(
                "benchmark=longdoc needs ckpt_path=...: the model's tokenizer, vision tokens and window "
                "(max_length) decide what each view shows"
            )
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
                prompt, kept = text_prompt(document, question, encode, budget)
                pages = meta["pages"]
                vision_prompt_tokens = len(processor.encode_prompt(sample["prompt"], pages))
                common = {
                    "length": length,
                    **accounting.count(document),
                    "text_tokens": len(tokenizer.encode(document)),
                    "text_window_tokens": budget - len(encode(text_prompt("", question, encode, budget)[0])),
                    "fits_as_text": kept == len(document),
                    "pages": pages,
                    "vision_tokens": pages * vision_tokens,
                    "vision_fits": vision_prompt_tokens <= budget,
                    "answer_page": meta["answer_page"],
                }
                base = sample["key"]
                if "vision" in self.views:
                    items.append(
                        Item(
                            f"{base}/vision",
                            sample["images"],
                            sample["prompt"],
                            sample["answers"],
                            {"view": "vision", **common},
                        )
                    )
                if "text" in self.views:
                    answer_end = meta["answer_start"] + len(sample["answers"][0])
                    text_meta = {"kept_share": kept / len(document), "answer_kept": kept >= answer_end}
                    items.append(
                        Item(
                            f"{base}/text",
                            None,
                            prompt,
                            sample["answers"],
                            {"view": "text", **common, **text_meta},
                        )
                    )
        return self.limited(items)

    def generation_groups(self, items: list[Item]) -> dict[str, list[Item]]:
        """One timed pass per view; pages that do not fit in the window are not shown to the model."""
        groups = {view: [i for i in items if i.meta["view"] == view] for view in self.views}
        groups["vision"] = [i for i in groups.get("vision", []) if i.meta["vision_fits"]]
        return {view: group for view, group in groups.items() if group}

    def score(self, items: list[Item], predictions: dict[str, str], context: Context) -> Result:
        shown = [i for i in items if i.meta["view"] != "vision" or i.meta["vision_fits"]]
        predictions, notes = empty_for_missing(shown, predictions, "questions")
        unfit = [i for i in items if i.meta["view"] == "vision" and not i.meta["vision_fits"]]
        if unfit:
            lengths = sorted({i.meta["length"] for i in unfit})
            notes.append(
                f"{len(unfit)} documents (lengths {lengths} characters) have more pages than fit in the "
                f"window of {context.max_length} tokens: no vision answer"
            )
        if getattr(self, "unrendered", None):
            notes.append(
                f"documents with a word wider than the page, left out (per length): {self.unrendered}"
            )
        samples = []
        for item in shown:
            prediction = predictions[item.key].strip()
            samples.append(
                {
                    "key": item.key,
                    **item.meta,
                    "prediction": prediction,
                    "answer": item.answers[0],
                    "exact_match": float(prediction in item.answers),
                    "anls": anls_score(prediction, item.answers),
                }
            )
        accounting = self.accounting(context)
        curve = [
            self._point(length, samples, items, accounting)
            for length in dict.fromkeys(i.meta["length"] for i in items)
        ]
        window = mean(i.meta["text_window_tokens"] for i in items)
        metrics: dict = {
            "questions": len(shown),
            "max_length": context.max_length,
            "text_window_tokens": window,
            "vision_tokens_per_image": context.vision_tokens_per_image,
        }
        for view in self.views:
            rows = [r for r in samples if r["view"] == view]
            seconds = context.generation_seconds.get(view)
            metrics[view] = {
                "questions": len(rows),
                "exact_match": mean(r["exact_match"] for r in rows),
                "anls": mean(r["anls"] for r in rows),
                "seconds_per_question": seconds / len(rows) if seconds is not None and rows else None,
            }
            for where, fits in (("within_window", True), ("beyond_window", False)):
                inside = [r for r in rows if r["fits_as_text"] == fits]
                metrics[where] = metrics.get(where, {}) | {
                    f"{view}_exact_match": mean(r["exact_match"] for r in inside),
                    f"{view}_anls": mean(r["anls"] for r in inside),
                    f"{view}_questions": len(inside),
                }
        vision_rows = [r for r in samples if r["view"] == "vision"]
        if vision_rows:  # each document's ratios, averaged over the documents shown as pages
            ratios = [accounting.ratios(r, r["vision_tokens"]) for r in vision_rows]
            metrics["vision"] |= {key: mean(r[key] for r in ratios) for key in ratios[0]}
            metrics["vision"]["mean_vision_tokens"] = mean(r["vision_tokens"] for r in vision_rows)
        x_label = f"document length ({llm_tokenizer_name(context.tokenizer)} tokens)"
        plot = accuracy_plot(curve, self.views, window, context.max_length, x_label)
        plots = {"accuracy_vs_length": plot}
        return Result(metrics, samples, {"curve": curve}, plots, notes)

    def _point(self, length: int, samples: list[dict], items: list[Item], accounting: TextAccounting) -> dict:
        """One length's row of the curve: sizes, then each view's scores (None where nothing was shown)."""
        documents = [i.meta for i in items if i.meta["length"] == length and i.meta["view"] == self.views[0]]
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
        for view in self.views:
            shown = [r for r in rows if r["view"] == view]
            point[f"{view}_questions"] = len(shown)
            point[f"{view}_exact_match"] = mean(r["exact_match"] for r in shown) if shown else None
            point[f"{view}_anls"] = mean(r["anls"] for r in shown) if shown else None
        if "text" in self.views:
            text = [r for r in rows if r["view"] == "text"]
            point["text_kept_share"] = mean(r["kept_share"] for r in text) if text else None
            point["text_answer_kept"] = mean(float(r["answer_kept"]) for r in text) if text else None
            full = [r for r in text if r["fits_as_text"]]
            point["full_text_questions"] = len(full)
            point["full_text_exact_match"] = mean(r["exact_match"] for r in full) if full else None
            point["full_text_anls"] = mean(r["anls"] for r in full) if full else None
        return point


def accuracy_plot(curve: list[dict], views: list[str], window: float, max_length: int, x_label: str):
    """A plot maker: exact match and ANLS against document text tokens, per view, the full-text upper
    bound where the document fits, the share of documents whose answer the text view kept (the most it
    can get right), and the text window marked."""

    def make(path: Path) -> None:
        import matplotlib.pyplot as plt

        lines = [(view, f"{view} view", marker) for view, marker in zip(views, "os", strict=False)]
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
