"""Long documents with planted facts, shown as page images (vision view) or as text (text view).

The question the project exists for: can a small LLM answer about a document far longer than its
context window when the document comes as pages compressed into vision tokens? `LongDoc` builds
documents from the offline prose corpus (`vlm.corpus`) with `facts_per_doc` statements "The code
of <name> is <value>." planted at random sentence boundaries (names from `NAMES`, values of
`value_digits` digits, unique within a document), asks about one of them ("What is the code of
<name>?", the value as the exact answer), and renders the document into as many pages of `image_size`
as it needs. It writes them once as shards (`RenderedShards`, as the synthetic data):

    python -m vlm.app.longdoc                        # conf/data/longdoc.yaml
    python -m vlm.app.longdoc data.source.max_chars=2000 data.source.image_size=[64,512]

A sample has its pages (`<key>.0.png`, ...), the vision prompt (one `<image>` per page, then the
question) and in `meta` the document text, the question, the page boundaries and the page with the
answer. The view is chosen when a sample is read (`LongDocView`, `data.view`), so every view shows the
same samples: `vision` the pages; `text` the document text followed by the question, the document cut
at its END (its beginning kept, at a word boundary) when the prompt and the answer would not fit in
`max_length` tokens (`text_prompt`); `pages_as_text` the vision prompt with each page's text in place of
its image (`page_texts`), for the text context arms that fill each page's K positions from its text;
`both` each sample as vision or text. Each view goes with some context arms only (`VIEW_CONTEXTS`,
checked when the view is built).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from vlm import IMAGE_TOKEN, corpus
from vlm.data.datamodule import ShardDataModule
from vlm.data.processing import SampleProcessor, load_record
from vlm.data.render import TextDoesNotFit, line_layout, load_font, random_style, render, wrap
from vlm.data.skips import Skip
from vlm.data.stream import stable_seed
from vlm.data.synthetic import RenderedShards, png_bytes

NAMES = (
    "Alder", "Aster", "Basil", "Birch", "Cedar", "Clover", "Dahlia", "Daisy",
    "Elm", "Fennel", "Ginger", "Hazel", "Heron", "Iris", "Juniper", "Kestrel",
    "Larch", "Lupin", "Maple", "Myrtle", "Nettle", "Oak", "Poplar", "Quince",
    "Rowan", "Sorrel", "Tansy", "Thistle", "Umber", "Violet", "Willow", "Yarrow",
)  # fmt: skip
FACT = "The code of {name} is {value}."
QUESTION = "What is the code of {name}?"
# what each data view shows, and the context arms (model.context, vlm.models.context) that read it
VIEW_CONTEXTS = {
    "vision": ("vision",),  # the page images: the encoder reads them
    "text": ("vision", "truncate", "full_text"),  # the document's tokens in the prompt, no <image>
    "pages_as_text": ("text_meanpool", "text_conv", "truncate", "full_text"),  # each page's text per <image>
    "both": ("vision",),  # vision or text, per sample
}
VIEWS = tuple(VIEW_CONTEXTS)
MARGIN = 4  # pixels around the text of a page (render's margin)


@dataclass(frozen=True)
class Fact:
    name: str
    value: str
    start: int  # character offset of the statement in the document

    @property
    def statement(self) -> str:
        return FACT.format(name=self.name, value=self.value)

    @property
    def value_start(self) -> int:
        """Character offset of the value in the document."""
        return self.start + len(self.statement) - len(self.value) - 1


@dataclass(frozen=True)
class Document:
    text: str
    facts: tuple[Fact, ...]
    asked: int  # the fact the question is about

    @property
    def answer(self) -> Fact:
        return self.facts[self.asked]


@functools.lru_cache
def _paragraphs(split: str) -> tuple[str, ...]:
    # a literal <image> in the prose would read as a placeholder in the text view
    return tuple(p for p in corpus.paragraphs_for(split) if IMAGE_TOKEN not in p)


def paginate(text: str, font, size: tuple[int, int], margin: int = MARGIN) -> list[str]:
    """`text` word-wrapped to the page width and cut into pages of as many lines as `render` fits in
    one image of `size` (height, width); the pages joined by spaces give `text` back."""
    height, width = size
    lines = wrap(text, font, width - 2 * margin)
    line_height, per_page = line_layout(font, height, margin)
    if per_page < 1:
        raise TextDoesNotFit(f"not one line of {line_height}px fits in a page of {height}px")
    return [" ".join(lines[i : i + per_page]) for i in range(0, len(lines), per_page)]


@dataclass
class LongDoc(RenderedShards):
    """Multi-page documents with planted facts and one question each (see the module docstring).

    `image_size` is the page size; documents are `min_chars`..`max_chars` characters (uniform), so the
    page count follows from the length and the font. One style (font, size, ink, paper) per document.
    """

    source_name: ClassVar[str] = "longdoc"
    root: str = "data/longdoc"
    min_chars: int = 100
    max_chars: int = 1000
    num_train: int = 8000
    num_val: int = 256
    num_test: int = 256
    samples_per_shard: int = 500
    facts_per_doc: int = 1
    value_digits: int = 3
    question: str = QUESTION  # {name}: the asked fact's name
    fonts: list[str] = field(default_factory=lambda: ["DejaVuSans"])  # one font and size by default
    font_sizes: list[int] = field(default_factory=lambda: [13])

    def __post_init__(self) -> None:
        super().__post_init__()
        if "{name}" not in self.question or IMAGE_TOKEN in self.question:
            raise ValueError(
                f"data.source.question={self.question!r} must contain {{name}} and no {IMAGE_TOKEN}"
            )
        if not 1 <= self.facts_per_doc <= len(NAMES):
            raise ValueError(f"data.source.facts_per_doc={self.facts_per_doc}: expected 1..{len(NAMES)}")
        if not 1 <= self.value_digits <= 9 or 9 * 10 ** (self.value_digits - 1) < self.facts_per_doc:
            raise ValueError(
                f"data.source.value_digits={self.value_digits}: expected 1..9 digits, enough values for "
                f"facts_per_doc={self.facts_per_doc} distinct ones"
            )
        if not 0 < self.min_chars <= self.max_chars:
            raise ValueError(
                f"data.source: need 0 < min_chars <= max_chars, got {self.min_chars}..{self.max_chars}"
            )

    def values(self) -> list[str]:
        """Every possible value (the text view reserves room for the longest)."""
        low = 10 ** (self.value_digits - 1) if self.value_digits > 1 else 0
        return [str(v) for v in range(low, 10**self.value_digits)]

    def document(self, split: str, tag: str, length: int | None = None) -> Document:
        """The document of sample `tag` of a split, `length` characters (default: drawn), deterministic."""
        rng = random.Random(f"{self.seed}-{split}-{tag}")
        length = rng.randint(self.min_chars, self.max_chars) if length is None else length
        names = rng.sample(NAMES, self.facts_per_doc)
        values = rng.sample(self.values(), self.facts_per_doc)
        statements = [FACT.format(name=n, value=v) for n, v in zip(names, values, strict=True)]
        filler = self._filler(rng, split, length - sum(len(s) + 1 for s in statements))
        # facts go at sentence boundaries (or anywhere, when the filler has too few of them)
        slots = [i for i in range(len(filler) + 1) if i == 0 or filler[i - 1].endswith(".")]
        if len(slots) < len(statements):
            slots = list(range(len(filler) + 1))
        positions = sorted(
            rng.choices(slots, k=len(statements))
        )  # fact k goes before filler word positions[k]
        pieces: list[str] = []
        facts: list[Fact] = []
        offset = 0
        for i in range(len(filler) + 1):
            while len(facts) < len(statements) and positions[len(facts)] == i:
                k = len(facts)
                facts.append(Fact(names[k], values[k], offset))
                pieces.append(statements[k])
                offset += len(statements[k]) + 1
            if i < len(filler):
                pieces.append(filler[i])
                offset += len(filler[i]) + 1
        asked = rng.randrange(len(facts))
        return Document(" ".join(pieces), tuple(facts), asked)

    def _filler(self, rng: random.Random, split: str, chars: int) -> list[str]:
        """Words of consecutive corpus paragraphs from a random one on, at most `chars` characters."""
        if chars < 0:
            raise ValueError(
                f"a document of {self.min_chars} characters cannot hold {self.facts_per_doc} fact(s) "
                f"({FACT}); raise data.source.min_chars"
            )
        paragraphs = _paragraphs(split)
        words: list[str] = []
        used, index = -1, rng.randrange(len(paragraphs))
        while True:
            for word in paragraphs[index % len(paragraphs)].split(" "):
                if used + 1 + len(word) > chars:
                    return words
                words.append(word)
                used += 1 + len(word)
            index += 1

    def sample(
        self, split: str, tag: str, fonts: Sequence[str | None], length: int | None = None
    ) -> dict | None:
        """Sample `<split>-<tag>` in the shard schema with its pages rendered, or None when a word is
        wider than a page."""
        doc = self.document(split, tag, length)
        style = random_style(random.Random(f"{self.seed}-{split}-{tag}-style"), list(fonts), self.font_sizes)
        try:
            pages = paginate(doc.text, load_font(style.font, style.font_size), self.image_size)
        except TextDoesNotFit:
            return None
        page_starts = [0]
        for page in pages[:-1]:
            page_starts.append(page_starts[-1] + len(page) + 1)
        answer_page = max(i for i, start in enumerate(page_starts) if start <= doc.answer.value_start)
        question = self.question.format(name=doc.answer.name)
        return {
            "key": f"{split}-{tag}",
            "images": [png_bytes(render(page, self.image_size, style, MARGIN)) for page in pages],
            "image_ext": "png",
            "task": "longdoc_qa",
            "prompt": IMAGE_TOKEN * len(pages) + "\n" + question,
            "answers": [doc.answer.value],
            "meta": {
                "source": "longdoc",
                "split": split,
                "document": doc.text,
                "question": question,
                "chars": len(doc.text),
                "pages": len(pages),
                "page_starts": page_starts,
                "answer_page": answer_page,
                "answer_start": doc.answer.value_start,
                "facts": [{"name": f.name, "value": f.value, "start": f.start} for f in doc.facts],
                "asked": doc.asked,
                "font": style.font,
                "font_size": style.font_size,
            },
        }

    def jobs(self, split: str, count: int, fonts: list[str | None]) -> list[tuple]:
        _paragraphs(split)  # once here, before the rendering processes fork
        return [(split, f"{i:07d}", fonts) for i in range(count)]

    def render_one(self, job: tuple) -> dict | None:
        split, tag, fonts = job
        return self.sample(split, tag, fonts)


def page_texts(meta: dict) -> list[str]:
    """The text of each page of a longdoc sample, from its document and page boundaries."""
    starts, document = meta["page_starts"], meta["document"]
    ends = [start - 1 for start in starts[1:]] + [len(document)]
    return [document[start:end] for start, end in zip(starts, ends, strict=True)]


# -- the views ---------------------------------------------------------------------------------------
def answer_slot(tokenizer, values: Sequence[str]) -> int:
    """Tokens kept free for the answer in the text view: the longest value and end-of-sequence."""
    return max(len(tokenizer.encode(value)) for value in values) + 1


def text_prompt(
    document: str, question: str, encode: Callable[[str], Sequence[int]], budget: int
) -> tuple[str, int]:
    """The text view's prompt `<document>\\n<question>` in at most `budget` tokens (`encode` counts a
    prompt's ids): the whole document when it fits, else its longest word-aligned beginning (the end
    is cut). Returns (prompt, characters of the document kept)."""

    def prompt(kept: str) -> str:
        return f"{kept}\n{question}"

    if len(encode(prompt(document))) <= budget:
        return prompt(document), len(document)
    if len(encode(prompt(""))) > budget:
        raise ValueError(f"the question alone takes more than {budget} tokens: {question!r}")
    words = document.split(" ")
    fits, too_long = 0, len(words)  # words kept: binary search for the most that fit
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if len(encode(prompt(" ".join(words[:middle])))) <= budget:
            fits = middle
        else:
            too_long = middle
    kept = " ".join(words[:fits])
    return prompt(kept), len(kept)


def check_view(view: str, context: str | None, option: str = "data.view") -> None:
    """ValueError naming both when the data view `view` is not one the context arm `context` reads
    (None: the view's name alone is checked)."""
    if view not in VIEWS:
        raise ValueError(f"{option}={view!r}: expected one of {', '.join(VIEWS)}")
    if context is not None and context not in VIEW_CONTEXTS[view]:
        fitting = [v for v, contexts in VIEW_CONTEXTS.items() if context in contexts]
        raise ValueError(
            f"{option}={view} does not go with context={context}: {view} is read by context="
            f"{'|'.join(VIEW_CONTEXTS[view])}; context={context} reads {option}={'|'.join(fitting)} "
            f"(conf/longdoc_arm/ sets both)"
        )


class LongDocView:
    """A longdoc sample shown as its pages, its (truncated) text or its pages' texts, then processed as
    usual by `processor`, whose context arm must read the view (`VIEW_CONTEXTS`).

    `view=both` shows a training sample as text with probability `text_share` (drawn per read), an
    evaluation sample by a hash of its key (the same view at every validation). A vision sample also
    carries each page's text as token ids (`image_text_ids`, batched by the Collator) for per-page
    reading losses. A `pages_as_text` sample gives each page's text as that page's context text; a text
    sample has none (`context_text: []`: its prompt holds no `<image>`).
    """

    def __init__(
        self,
        processor: SampleProcessor,
        view: str,
        values: Sequence[str],
        text_share: float = 0.5,
        follow_ups: bool = False,
        question: str = QUESTION,
    ):
        check_view(view, processor.context)
        if not 0 <= text_share <= 1:
            raise ValueError(f"data.text_share={text_share}: expected a share in [0, 1]")
        self.processor, self.view, self.text_share = processor, view, text_share
        self.follow_ups, self.question = follow_ups, question
        self.budget = processor.max_length - answer_slot(processor.tokenizer, values)

    @property
    def max_length(self) -> int:
        """The processor's token budget per sample (what a packed row holds)."""
        return self.processor.max_length

    def view_of(self, key: str) -> str:
        if self.view != "both":
            return self.view
        draw = random.random() if self.processor.train else stable_seed("view", key) % 10_000 / 10_000
        return "text" if draw < self.text_share else "vision"

    def encode(self, prompt: str) -> list[int]:
        return self.processor.encode_prompt(prompt, 0)

    def __call__(self, raw: dict) -> dict:
        key = raw.get("__key__", "?")
        if "json" not in raw:
            return self.processor(raw)  # it names what is missing
        record = load_record(raw["json"], key)
        try:
            meta = record["meta"]
            document, question, pages = meta["document"], meta["question"], page_texts(meta)
            if not isinstance(document, str) or not isinstance(question, str):
                raise TypeError("document and question must be strings")
        except (KeyError, TypeError, ValueError) as error:
            raise Skip("malformed_record", f"not a longdoc sample ({error!r})", key=key) from error
        view = self.view_of(key)
        if view == "text":  # the pages dropped, the document's text in the prompt
            prompt, _ = text_prompt(document, question, self.encode, self.budget)
            record = {**record, "prompt": prompt, "context_text": []}
            raw = {"__key__": key, "json": json.dumps(record).encode()}
        elif view == "pages_as_text":  # the vision prompt, each page's text for its <image>
            raw = {"__key__": key, "json": json.dumps({**record, "context_text": pages}).encode()}
        sample = self.processor(raw)
        sample["view"] = view
        if view == "vision":
            if len(pages) != len(sample["pixel_values"]):
                raise Skip(
                    "malformed_record",
                    f"{len(pages)} page texts for {len(sample['pixel_values'])} pages",
                    key=key,
                )
            sample["image_text_ids"] = [self.processor.tokenizer.encode(page) for page in pages]
        if self.follow_ups and self.processor.train:
            sample["answer_ids"] = self.with_follow_ups(sample, meta, key)
        return sample

    def with_follow_ups(self, sample: dict, meta: dict, key: str) -> list[int]:
        """The answer, then the questions about the document's other facts (in a random order), each with
        its value and end-of-sequence, as many as fit in `max_length`: four times the answers per
        document, and the question's name to copy from the document (`data.follow_ups`, training only)."""
        tokenizer = self.processor.tokenizer
        try:
            others = [fact for i, fact in enumerate(meta["facts"]) if i != meta["asked"]]
            turns = [
                [
                    *tokenizer.encode("\n" + self.question.format(name=fact["name"])),
                    *tokenizer.encode(fact["value"]),
                    tokenizer.eos_id,
                ]
                for fact in random.sample(others, len(others))
            ]
        except (KeyError, TypeError) as error:
            raise Skip("malformed_record", f"its facts cannot be asked ({error!r})", key=key) from error
        answer, room = list(sample["answer_ids"]), self.processor.max_length - len(sample["prompt_ids"])
        for turn in turns:
            if len(answer) + len(turn) > room:
                break
            answer += turn
        return answer


class LongDocDataModule(ShardDataModule):
    """`ShardDataModule` over a `LongDoc` source, each sample shown as `view` (vision, text,
    pages_as_text or both); a view the model's context arm does not read fails here, at start-up."""

    def __init__(
        self,
        processor_factory,
        pad_id: int,
        source: LongDoc,
        view: str = "both",
        text_share: float = 0.5,
        follow_ups: bool = False,
        **kwargs,
    ) -> None:
        if not isinstance(source, LongDoc):
            raise ValueError(f"data.source must be a vlm.data.longdoc.LongDoc, got {type(source).__name__}")
        values = source.values()
        self.context = None  # the model's context arm; None without a model (eval.py predictions=)
        check_view(view, None)
        if processor_factory is not None:
            processor = processor_factory(False)
            LongDocView(processor, view, values, text_share)  # bad options fail here
            self.context = processor.context
        self.view, self.text_share = view, text_share

        def factory(train: bool) -> LongDocView:
            return LongDocView(
                processor_factory(train), view, values, text_share, follow_ups, source.question
            )

        super().__init__(factory, pad_id, source=source, **kwargs)
