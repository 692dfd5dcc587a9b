"""COCO caption metrics (BLEU-1..4, ROUGE-L, CIDEr-D) without Java.

Re-implementation of the scorers of the official COCO caption evaluation code (``tylin/coco-caption``,
packaged as ``pycocoevalcap``): ``bleu/bleu_scorer.py``, ``rouge/rouge.py`` and ``cider/cider_scorer.py``
(the scorer that pycocoevalcap reports as "CIDEr" is CIDEr-D: clipped tf-idf and a Gaussian length
penalty). Every scorer follows the original arithmetic, including its epsilons and quirks; the
docstrings say which. METEOR and SPICE are not provided (both run Java programs).

Tokenisation deviation: pycocoevalcap first runs the Stanford PTB tokenizer (Java, CoreNLP 3.4.1,
``-preserveLines -lowerCase``) over every caption and then drops the tokens in its ``PUNCTUATIONS`` list.
We replace that with :func:`tokenize`, a small regex approximation; see its docstring for what matches
and what does not. Scores are therefore close to, but not guaranteed identical with, pycocoevalcap's.

Inputs are ``candidates: {image_id: caption}`` (one caption per image, as pycocoevalcap asserts) and
``references: {image_id: [caption, ...]}``. Only the images present in ``candidates`` are evaluated
(``COCOEvalCap`` evaluates the image ids of the result file); references of other images are ignored,
which matters for CIDEr-D's document frequencies.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

__all__ = [
    "PTB_REMOVED_PUNCTUATION",
    "TOKENIZATION_NOTE",
    "bleu",
    "caption_scores",
    "cider_d",
    "cider_d_per_image",
    "rouge_l",
    "rouge_l_per_image",
    "tokenize",
]

#: pycocoevalcap's ``PTBTokenizer.PUNCTUATIONS``, the tokens it removes after PTB tokenisation (the
#: upper-case bracket entries never match the ``-lowerCase`` output, so brackets stay; see `tokenize`).
PTB_REMOVED_PUNCTUATION: tuple[str, ...] = (
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
    ".", "?", "!", ",", ":", "-", "--", "...", ";",
)  # fmt: skip

TOKENIZATION_NOTE = (
    "PTB tokenizer (Java) replaced by vlm.eval.captions.tokenize: lowercase; clitics split as PTB does "
    "(n't 's 're 've 'll 'd 'm); brackets become -lrb- -rrb- -lcb- -rcb- (PTB's escapes, lower-cased); "
    "removed: . , : (kept between digits) ? ! ; quotes ' \" ` and stand-alone/edge - -- ...; other "
    "symbols kept attached; abbreviations such as 'a.m.' are split"
)

_UNICODE_PUNCT = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": " - ",
        "\u2014": " -- ",
        "\u2026": " ... ",
    }
)
_NEGATION = re.compile(r"(?<=\w)n't\b")
_CLITIC = re.compile(r"(?<=\w)'(s|re|ve|ll|d|m)\b")
_ALWAYS_REMOVED = re.compile(r"[?!;\"`]")
# PTB escapes brackets (normalizeParentheses, normalizeOtherBrackets: [ ] as round ones) and -lowerCase
# lowercases the escapes, which pycocoevalcap's upper-case removal list then misses: they stay as words
_BRACKETS = {"(": "-lrb-", "[": "-lrb-", ")": "-rrb-", "]": "-rrb-", "{": "-lcb-", "}": "-rcb-"}
_BRACKET = re.compile(r"[()\[\]{}]")
_SEPARATOR = re.compile(r"(?<!\d)[.,:]|[.,:](?!\d)")  # kept only between two digits: 3.5, 1,000, 10:30
_CLITICS = frozenset({"n't", "'s", "'re", "'ve", "'ll", "'d", "'m"})
_KEPT_WHOLE = _CLITICS | frozenset(_BRACKETS.values())


def tokenize(text: str) -> list[str]:
    """Lowercased caption tokens with punctuation removed -- a Java-free stand-in for pycocoevalcap's PTB step.

    pycocoevalcap tokenises with Stanford's PTBTokenizer (``-lowerCase``) and then drops the tokens
    ``'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;`` (:data:`PTB_REMOVED_PUNCTUATION`): i.e.
    quotes, sentence punctuation, hyphens/dashes standing alone, ellipses. Its bracket entries never
    match: ``-lowerCase`` lowercases each token after PTB escaping, so ``( )`` come out as
    ``-lrb- -rrb-`` (braces ``-lcb- -rcb-``, square brackets likewise) and stay in the caption as words.
    This function reproduces that too (brackets become those words) and the rest:

    * lowercase; curly quotes become straight ones, en/em dashes and the ellipsis character become
      ``-``/``--``/``...``; newlines are whitespace;
    * clitics are split off as PTB does and kept as tokens: ``don't -> do n't``, ``can't -> ca n't``,
      ``man's -> man 's`` (also ``'re 've 'll 'd 'm``);
    * brackets become tokens of their own, ``( [ -> -lrb-``, ``) ] -> -rrb-``, ``{ -> -lcb-``,
      ``} -> -rcb-`` (CoreNLP's mapping of square brackets to round ones: checked against its
      documentation, not against the 3.4.1 jar pycocoevalcap ships);
    * ``? ! ; " `` ` are removed; ``. , :`` are removed unless between two digits (``3.5``,
      ``1,000`` and ``10:30`` stay one token, as in PTB);
    * remaining apostrophes and hyphens at a token's edges are stripped (``dogs' -> dogs``, ``-- -> ``);
      inner ones stay (``black-and-white``, ``o'clock``).

    Known differences from PTB + pycocoevalcap: PTB keeps abbreviations with their periods (``a.m.``,
    ``u.s.``), we split them; PTB splits some symbols into their own
    tokens (``$5 -> $ 5``, ``50% -> 50 %``) and escapes ``/`` and ``*``, we leave such symbols attached.
    These are rare in COCO captions.
    """
    s = text.translate(_UNICODE_PUNCT).lower()
    s = _NEGATION.sub(" n't", s)
    s = _CLITIC.sub(lambda m: " '" + m.group(1), s)
    s = _ALWAYS_REMOVED.sub(" ", s)
    s = _SEPARATOR.sub(" ", s)
    s = _BRACKET.sub(lambda m: f" {_BRACKETS[m.group(0)]} ", s)
    tokens: list[str] = []
    for tok in s.split():
        if tok not in _KEPT_WHOLE:
            tok = tok.strip("'-")
        if tok:
            tokens.append(tok)
    return tokens


# ---------------------------------------------------------------------------------------------------------
# shared helpers


def _ngrams(tokens: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    """Counts of all n-grams of orders 1..max_n (``precook`` in bleu_scorer.py / cider_scorer.py)."""
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, max_n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i : i + k])] += 1
    return counts


def _prepare(
    candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], pretokenized: bool
) -> list[tuple[Hashable, list[str], list[list[str]]]]:
    """Token lists per evaluated image, in the candidates' order; validates the inputs."""
    split = str.split if pretokenized else tokenize
    out = []
    for image_id, cand in candidates.items():
        if not isinstance(cand, str):
            raise TypeError(f"candidate for {image_id!r} must be one string (one caption per image)")
        if image_id not in references:
            raise KeyError(f"no references for image {image_id!r}")
        refs = references[image_id]
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references for {image_id!r} must be a non-empty list of strings")
        out.append((image_id, split(cand), [split(r) for r in refs]))
    if not out:
        raise ValueError("no candidates to evaluate")
    return out


# ---------------------------------------------------------------------------------------------------------
# BLEU


def bleu(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    n: int = 4,
    pretokenized: bool = False,
) -> list[float]:
    """Corpus BLEU-1..BLEU-n exactly as pycocoevalcap's ``Bleu`` (``BleuScorer.compute_score(option="closest")``).

    * Per image: clipped n-gram matches ``correct_k = sum_g min(count_hyp(g), max_ref count_ref(g))``,
      ``guess_k = max(0, len(hyp) - k + 1)``; effective reference length = the reference length closest to
      the hypothesis length (ties -> the shorter one).
    * Corpus level: matches, guesses and lengths are summed over images before dividing (not a mean of
      per-image BLEU); ``BLEU-N = prod_{k<=N} ((correct_k + 1e-15) / (guess_k + 1e-9)) ** (1 / N)``. The
      epsilons are the scorer's ``tiny``/``small``: a zero match count gives a tiny positive value, not 0.
    * Brevity penalty (same for every N): ``ratio = (testlen + 1e-15) / (reflen + 1e-9)``; if
      ``ratio < 1`` multiply by ``exp(1 - 1 / ratio)``. (So equal lengths still give a factor of
      ``1 - 1e-10``-ish, as in the original.)

    ``pretokenized=True`` splits on whitespace instead of calling :func:`tokenize` (pycocoevalcap's scorers
    receive PTB-tokenised, space-joined captions).
    """
    tiny, small = 1e-15, 1e-9
    correct = [0] * n
    guess = [0] * n
    testlen_total = 0
    reflen_total = 0
    for _, hyp, refs in _prepare(candidates, references, pretokenized):
        max_ref: dict[tuple[str, ...], int] = {}
        for ref in refs:
            for gram, count in _ngrams(ref, n).items():
                max_ref[gram] = max(max_ref.get(gram, 0), count)
        testlen = len(hyp)
        testlen_total += testlen
        reflen_total += min((abs(len(r) - testlen), len(r)) for r in refs)[1]
        for k in range(n):
            guess[k] += max(0, testlen - k)
        for gram, count in _ngrams(hyp, n).items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), count)

    ratio = (testlen_total + tiny) / (reflen_total + small)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores = []
    product = 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)) * penalty)
    return scores


# ---------------------------------------------------------------------------------------------------------
# ROUGE-L


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (``my_lcs`` in rouge.py)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l_per_image(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    beta: float = 1.2,
    pretokenized: bool = False,
) -> dict[Hashable, float]:
    """Per-image ROUGE-L of pycocoevalcap's ``Rouge.calc_score`` (see :func:`rouge_l`)."""
    scores: dict[Hashable, float] = {}
    for image_id, hyp, refs in _prepare(candidates, references, pretokenized):
        # rouge.py splits with str.split(" "): an empty caption is one empty token, which matches an
        # empty reference (LCS 1, so P = R = 1) and nothing else
        hyp = hyp or [""]
        precisions, recalls = [], []
        for ref in refs:
            ref = ref or [""]
            lcs = _lcs_length(ref, hyp)
            precisions.append(lcs / len(hyp))
            recalls.append(lcs / len(ref))
        p, r = max(precisions), max(recalls)
        scores[image_id] = (1 + beta**2) * p * r / (r + beta**2 * p) if p != 0 and r != 0 else 0.0
    return scores


def rouge_l(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    beta: float = 1.2,
    pretokenized: bool = False,
) -> float:
    """ROUGE-L of pycocoevalcap (``rouge/rouge.py``), mean over images.

    Per image: for every reference, ``P_j = LCS / len(candidate)`` and ``R_j = LCS / len(reference_j)``
    (token-level longest common subsequence); then ``P = max_j P_j`` and ``R = max_j R_j`` *separately*
    (they may come from different references) and ``F = (1 + beta^2) P R / (R + beta^2 P)`` with
    ``beta = 1.2``; ``F = 0`` if P or R is 0. An empty caption (nothing left after tokenisation) counts as
    the original's one empty token (``"".split(" ") == [""]``): an empty candidate scores 1 against a set
    holding an empty reference and 0 otherwise, and an empty reference scores 0 against any non-empty
    candidate.
    """
    per_image = rouge_l_per_image(candidates, references, beta=beta, pretokenized=pretokenized)
    return sum(per_image.values()) / len(per_image)


# ---------------------------------------------------------------------------------------------------------
# CIDEr-D


def cider_d_per_image(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    n: int = 4,
    sigma: float = 6.0,
    pretokenized: bool = False,
) -> dict[Hashable, float]:
    """Per-image CIDEr-D of pycocoevalcap's ``CiderScorer`` (see :func:`cider_d`)."""
    prepared = _prepare(candidates, references, pretokenized)

    # document frequency: in how many evaluated images' reference sets (union over refs) an n-gram occurs
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for _, _, refs in prepared:
        doc_freq.update({gram for ref in refs for gram in _ngrams(ref, n)})
    log_num_images = math.log(float(len(prepared)))

    def to_vec(tokens: list[str]) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in _ngrams(tokens, n).items():
            k = len(gram) - 1
            weight = tf * (log_num_images - math.log(max(1.0, doc_freq[gram])))
            vec[k][gram] = weight
            norm[k] += weight**2
            if k == 1:  # the original counts bigrams as "length"; = words - 1, so deltas equal word deltas
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores: dict[Hashable, float] = {}
    for image_id, hyp, refs in prepared:
        vec_h, norm_h, len_h = to_vec(hyp)
        total = [0.0] * n
        for ref in refs:
            vec_r, norm_r, len_r = to_vec(ref)
            penalty = math.exp(-((len_h - len_r) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items())
                if norm_h[k] != 0 and norm_r[k] != 0:
                    val /= norm_h[k] * norm_r[k]
                total[k] += val * penalty
        scores[image_id] = sum(total) / n / len(refs) * 10.0
    return scores


def cider_d(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    n: int = 4,
    sigma: float = 6.0,
    pretokenized: bool = False,
) -> float:
    """CIDEr-D as computed by pycocoevalcap's ``Cider`` (``cider/cider_scorer.py``), mean over images.

    * Document frequency ``df(g)`` = number of evaluated images whose reference set contains n-gram
      ``g``; ``N`` = number of evaluated images (the IDF is corpus-dependent: the same caption scores
      differently in a different test set; with one image every IDF is ``log 1 = 0`` and CIDEr-D is 0).
    * Vectors per order k = 1..4: ``v(g) = tf(g) * (log N - log max(1, df(g)))`` with raw counts as tf.
    * Per reference and order: ``sum_g min(v_hyp(g), v_ref(g)) * v_ref(g) / (|v_hyp| |v_ref|)`` (the
      clipped cosine; left unnormalised -- in fact 0 -- when either norm is 0), times the Gaussian length
      penalty ``exp(-(l_hyp - l_ref)^2 / (2 sigma^2))``, ``sigma = 6``.
    * Image score = mean over the 4 orders of the per-reference sums, divided by the number of
      references, times 10. Corpus score = mean over images.
    """
    per_image = cider_d_per_image(candidates, references, n=n, sigma=sigma, pretokenized=pretokenized)
    return sum(per_image.values()) / len(per_image)


# ---------------------------------------------------------------------------------------------------------


def caption_scores(
    candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[str, float | str]:
    """BLEU-1..4, ROUGE-L and CIDEr-D of :func:`tokenize`-d captions, plus a ``tokenization`` note.

    Scales are pycocoevalcap's: BLEU and ROUGE-L in [0, 1], CIDEr-D typically in [0, 10] (papers
    usually print x100).
    """
    prepared = _prepare(candidates, references, pretokenized=False)
    tokenized_c = {i: " ".join(hyp) for i, hyp, _ in prepared}
    tokenized_r = {i: [" ".join(r) for r in refs] for i, _, refs in prepared}
    b = bleu(tokenized_c, tokenized_r, pretokenized=True)
    out: dict[str, float | str] = {f"BLEU-{k + 1}": b[k] for k in range(4)}
    out["ROUGE-L"] = rouge_l(tokenized_c, tokenized_r, pretokenized=True)
    out["CIDEr-D"] = cider_d(tokenized_c, tokenized_r, pretokenized=True)
    out["tokenization"] = TOKENIZATION_NOTE
    return out
