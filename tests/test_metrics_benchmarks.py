"""Hand-computed checks of the DocVQA (ANLS), COCO caption (BLEU/ROUGE-L/CIDEr-D) and Fox OCR metrics.

Every expected value below is derived by hand in the comments from the protocol definitions (official
DocVQA script, pycocoevalcap scorers, Fox eval_ocr_test.py + nltk), not by calling the code under test.
"""

from __future__ import annotations

import json
import math
import sys

import pytest

from vlm.eval.anls import anls, anls_score, docvqa_submission, normalized_levenshtein
from vlm.eval.captions import (
    TOKENIZATION_NOTE,
    bleu,
    caption_scores,
    cider_d,
    cider_d_per_image,
    rouge_l,
    rouge_l_per_image,
    tokenize,
)
from vlm.eval.ocr import corpus_ocr_scores, nltk_sentence_bleu, normalized_edit_distance, ocr_scores, words

# =========================================================================================================
# DocVQA ANLS


def test_anls_exact_and_case_whitespace_insensitive() -> None:
    assert anls_score("Denver Broncos", ["Denver Broncos"]) == 1.0
    # lower() + strip + collapse runs of whitespace (tabs/newlines too) -> identical strings, distance 0
    assert anls_score("  denver \t  BRONCOS\n", ["Denver Broncos"]) == 1.0
    # punctuation is NOT normalised: "dr." vs "dr" is one deletion over max(len) = 8 -> 1 - 1/8
    assert anls_score("Dear Dr", ["Dear Dr."]) == pytest.approx(1 - 1 / 8)


def test_anls_threshold_boundaries() -> None:
    # just below 0.5: "abcdefg" vs "abcdxyz" -> 3 substitutions / 7 = 0.4286 < 0.5 -> score 4/7
    assert anls_score("abcdxyz", ["abcdefg"]) == pytest.approx(4 / 7)
    # just above 0.5: "abcdefg" vs "abcwxyz" -> 4 / 7 = 0.571 -> 1 - NL = 0.4286 < 0.5 -> 0
    assert anls_score("abcwxyz", ["abcdefg"]) == 0.0
    # exactly 0.5: "abcd" vs "abxy" -> 2 / 4. The official script keeps 1 - 0.5 = 0.5 (only "< 0.5" is
    # zeroed); the paper's "NL < tau" would give 0 here. We follow the script.
    assert normalized_levenshtein("abxy", "abcd") == 0.5
    assert anls_score("abxy", ["abcd"]) == 0.5
    # a stricter threshold zeroes a score the default keeps: "12/15/89" vs "12/15/88" = 1 - 1/8
    assert anls_score("12/15/89", ["12/15/88"]) == pytest.approx(0.875)
    assert anls_score("12/15/89", ["12/15/88"], threshold=0.9) == 0.0


def test_anls_max_over_gold_answers() -> None:
    # "12/15/89" vs "1989": length difference 4 alone gives NL >= 4/8 -> at most 0.5;
    # vs "12/15/88": NL = 1/8 -> 0.875. Max over answers, whatever the order.
    assert anls_score("12/15/89", ["1989", "12/15/88"]) == pytest.approx(0.875)
    assert anls_score("12/15/89", ["12/15/88", "1989"]) == pytest.approx(0.875)
    # mean over questions: (0.875 + 1 + 0) / 3
    preds = ["12/15/89", "Lobo", "zzz"]
    gold = [["12/15/88"], ["dr. lobo", "LOBO"], ["abc"]]
    assert anls(preds, gold) == pytest.approx((0.875 + 1.0 + 0.0) / 3)


def test_anls_empty_strings_and_raw_length_quirk() -> None:
    assert anls_score("", [""]) == 1.0  # both empty: length 0 -> NL 0 -> 1
    assert anls_score("", ["abc"]) == 0.0  # 3 insertions / 3 -> NL 1
    assert anls_score("abc", [""]) == 0.0
    # official denominator = raw lengths: gold "a  b" (4 chars raw, "a b" normalised) vs "a c":
    # distance("a b", "a c") = 1, max(4, 3) = 4 -> 0.75 (normalised lengths would give 1 - 1/3)
    assert anls_score("a c", ["a  b"]) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        anls_score("x", [])
    with pytest.raises(ValueError):
        anls(["a"], [["a"], ["b"]])


def test_docvqa_submission_format(tmp_path) -> None:
    records = [{"questionId": "49153", "answer": "0.28"}, {"question_id": 24580, "prediction": "Lobo"}]
    path = tmp_path / "sub.json"
    out = docvqa_submission(records, path)
    assert out == [{"questionId": 49153, "answer": "0.28"}, {"questionId": 24580, "answer": "Lobo"}]
    assert json.loads(path.read_text(encoding="utf-8")) == out
    with pytest.raises(ValueError):
        docvqa_submission([{"questionId": 1, "answer": "a"}, {"questionId": 1, "answer": "b"}])


# =========================================================================================================
# COCO captions


def test_tokenize_matches_ptb_then_punctuation_removal() -> None:
    # PTB -lowerCase: a man 's dog , -lrb- sitting -rrb- on the `` mat '' . -> pycocoevalcap drops the
    # punctuation of its list, whose upper-case -LRB- -RRB- no longer match: the brackets stay as words
    assert tokenize('A man\'s dog, (sitting) on the "mat".') == [
        "a",
        "man",
        "'s",
        "dog",
        "-lrb-",
        "sitting",
        "-rrb-",
        "on",
        "the",
        "mat",
    ]
    assert tokenize("Don't STOP!") == ["do", "n't", "stop"]
    assert tokenize("A 3.5 ft black-and-white -- photo; 1,000 dogs' toys...") == [
        "a", "3.5", "ft", "black-and-white", "photo", "1,000", "dogs", "toys",
    ]  # fmt: skip
    assert tokenize("a [red] {cup}") == ["a", "-lrb-", "red", "-rrb-", "-lcb-", "cup", "-rcb-"]
    assert "PTB" in TOKENIZATION_NOTE


def test_bleu_tiny_corpus_by_hand() -> None:
    cands = {1: "a cat sits on the mat", 2: "a dog runs"}
    refs = {
        1: ["a cat is on the mat", "there is a cat on the mat"],
        2: ["a dog is running fast", "the dog runs"],
    }
    # Image 1 (hyp length 6; ref lengths 6, 7 -> closest 6):
    #   1-grams a cat sits on the mat: all but "sits" in a reference -> 5 / 6
    #   2-grams a_cat cat_sits sits_on on_the the_mat: a_cat, on_the, the_mat -> 3 / 5
    #   3-grams a_cat_sits cat_sits_on sits_on_the on_the_mat: on_the_mat -> 1 / 4
    #   4-grams (3 of them): none -> 0 / 3
    # Image 2 (hyp length 3; ref lengths 5, 3 -> closest 3):
    #   1-grams a dog runs -> 3 / 3; 2-grams a_dog (ref 1), dog_runs (ref 2) -> 2 / 2
    #   3-grams a_dog_runs -> 0 / 1; 4-grams -> 0 / 0
    # Corpus sums: correct = [8, 5, 1, 0], guess = [9, 7, 5, 3]; testlen = reflen = 9.
    tiny, small = 1e-15, 1e-9
    p = [
        (8 + tiny) / (9 + small),
        (5 + tiny) / (7 + small),
        (1 + tiny) / (5 + small),
        (0 + tiny) / (3 + small),
    ]
    ratio = (9 + tiny) / (9 + small)  # < 1 by ~1e-10, so the scorer applies exp(1 - 1/ratio) ~ 1 - 1e-10
    bp = math.exp(1 - 1 / ratio)
    expected = [bp * math.prod(p[:k]) ** (1 / k) for k in range(1, 5)]
    got = bleu(cands, refs)
    assert got == pytest.approx(expected, rel=1e-12)
    # readable values: 8/9, sqrt(40/63), (8/63)^(1/3), and BLEU-4 is tiny but not 0 (the 1e-15 epsilon)
    assert got[:3] == pytest.approx([0.888889, 0.796820, 0.502632], abs=1e-6)
    assert 0 < got[3] < 1e-4


def test_bleu_closest_length_and_corpus_brevity_penalty() -> None:
    # Single short hypothesis: "a cat" vs "a cat on the mat": testlen 2, reflen 5 -> BP = exp(1 - 5/2)
    got = bleu({0: "a cat"}, {0: ["a cat on the mat"]})
    assert got[0] == pytest.approx(math.exp(-1.5), rel=1e-8)  # p1 = 2/2 (epsilons: ~1e-9 relative)
    assert got[1] == pytest.approx(math.exp(-1.5), rel=1e-8)  # p2 = 1/1
    # Closest reference length with a tie (lengths 3 and 5 around testlen 4) takes the shorter one (3):
    # ratio 4/3 > 1 -> no penalty, BLEU-1 = 4/4. Taking 5 would have given exp(1 - 5/4).
    assert bleu({0: "a b c d"}, {0: ["a b c", "a b c d e"]})[0] == pytest.approx(1.0, rel=1e-9)
    # Corpus-level BP: image A is short (2 vs 5) but image B is long (6 vs 3): sums 8 vs 8 -> BP ~ 1.
    corpus = bleu({0: "a cat", 1: "x y z w v u"}, {0: ["a cat on the mat"], 1: ["x y z"]})
    # unigrams: A 2/2, B 3/6 -> 5/8; a per-image average would apply exp(-1.5) to A.
    assert corpus[0] == pytest.approx(5 / 8, rel=1e-8)


def test_rouge_l_by_hand() -> None:
    beta2 = 1.2**2
    # Image "x": cand "a cat on the mat" (5 tokens)
    #   ref "a cat" -> LCS 2: P = 2/5, R = 2/2 = 1
    #   ref "there is a black cat on the red mat" (9) -> LCS "a cat on the mat" = 5: P = 1, R = 5/9
    #   pycocoevalcap takes P = max P = 1 and R = max R = 1 (from different references) -> F = 1,
    #   although each reference alone gives F < 0.7.
    # Image "y": cand "the cat sat" vs "the black cat sat down" -> LCS 3: P = 1, R = 3/5
    #   F = (1 + 1.44) * 1 * 0.6 / (0.6 + 1.44 * 1) = 1.464 / 2.04 = 0.717647
    cands = {"x": "a cat on the mat", "y": "the cat sat"}
    refs = {"x": ["a cat", "there is a black cat on the red mat"], "y": ["the black cat sat down"]}
    f_y = (1 + beta2) * 1 * 0.6 / (0.6 + beta2 * 1)
    per = rouge_l_per_image(cands, refs)
    assert per["x"] == pytest.approx(1.0)
    assert per["y"] == pytest.approx(f_y) and f_y == pytest.approx(0.717647, abs=1e-6)
    assert rouge_l(cands, refs) == pytest.approx((1.0 + f_y) / 2)
    assert rouge_l({0: "zzz"}, {0: ["a b"]}) == 0.0


def test_cider_d_by_hand() -> None:
    cands = {1: "a dog", 2: "a cat cat", 3: "red car"}
    refs = {1: ["a dog", "a cat"], 2: ["a cat"], 3: ["a red car"]}
    # Step 1 -- document frequency over the 3 images' reference sets (union of n-grams per image):
    #   a: 3 | cat: 2 (img 1, 2) | dog, red, car: 1 | "a cat": 2 | "a dog", "a red", "red car": 1 |
    #   "a red car": 1 ; anything else (e.g. "cat cat"): 0 -> log max(1, 0) = 0.
    # Step 2 -- idf = log N - log max(1, df), N = 3:
    L = math.log(3)  # df 1 (or 0)
    c = math.log(3) - math.log(2)  # df 2: "cat", "a cat"
    #   "a": log 3 - log 3 = 0 -> "a" carries no weight anywhere.
    # Step 3 -- Gaussian length penalty, sigma = 6: exp(-delta^2 / 72); lengths 2 vs 2 -> 1
    g1 = math.exp(-1 / 72)  # |delta| = 1
    # Image 1, hyp "a dog": v1 = {a: 0, dog: L}, v2 = {a_dog: L}; no 3/4-grams (norm 0 -> value 0).
    #   ref "a dog": identical vectors -> cosine 1 for n = 1, 2 -> [1, 1, 0, 0]
    #   ref "a cat": v1 = {a: 0, cat: c}; shared terms only "a" (weight 0) -> [0, 0, 0, 0]
    #   score = mean_n([1, 1, 0, 0]) / 2 refs * 10 = 0.5 / 2 * 10 = 2.5
    img1 = (1 + 1 + 0 + 0) / 4 / 2 * 10
    # Image 2, hyp "a cat cat" (clipping!): v1 = {a: 0, cat: 2c}; v2 = {a_cat: c, cat_cat: L};
    #   v3 = {a_cat_cat: L}. Ref "a cat": v1 = {a: 0, cat: c}, v2 = {a_cat: c}; delta = 3 - 2 = 1.
    #   n=1: sum min(2c, c) * c = c^2 (clipped; unclipped would be 2c^2); norms 2c and c -> 1/2
    #   n=2: min(c, c) * c = c^2; norms sqrt(c^2 + L^2) and c -> c / sqrt(c^2 + L^2)
    #   n=3: the ref has no trigram (norm 0) -> 0 ; n=4: 0
    img2 = (0.5 + c / math.sqrt(c**2 + L**2)) * g1 / 4 / 1 * 10
    # Image 3, hyp "red car": v1 = {red: L, car: L}, v2 = {red_car: L}
    #   ref "a red car": v1 = {a: 0, red: L, car: L}, v2 = {a_red: L, red_car: L}, v3 = {a_red_car: L};
    #   delta = 2 - 3 = -1
    #   n=1: (L*L + L*L) / (sqrt(2) L * sqrt(2) L) = 1 ; n=2: L*L / (L * sqrt(2) L) = 1/sqrt(2)
    #   n=3: hyp has no trigram -> 0 ; n=4: 0
    img3 = (1 + 1 / math.sqrt(2)) * g1 / 4 / 1 * 10
    # numerically: img2 = (0.5 + 0.346242) * 0.986207 / 4 * 10 = 2.08643 ; img3 = 4.20890
    assert img2 == pytest.approx(2.08643, abs=1e-5) and img3 == pytest.approx(4.20890, abs=1e-5)

    per = cider_d_per_image(cands, refs)
    assert per[1] == pytest.approx(img1, rel=1e-12)
    assert per[2] == pytest.approx(img2, rel=1e-12)
    assert per[3] == pytest.approx(img3, rel=1e-12)
    assert cider_d(cands, refs) == pytest.approx((img1 + img2 + img3) / 3, rel=1e-12)  # = 2.93178

    # IDF depends on the evaluated corpus: image 2 alone has N = 1, every idf = log 1 - log 1 = 0 -> 0.
    assert cider_d({2: cands[2]}, {2: refs[2]}) == 0.0
    # references of images that are not evaluated are ignored (same result with an extra reference entry)
    assert cider_d(cands, {**refs, 99: ["a dog"]}) == pytest.approx(cider_d(cands, refs), rel=1e-12)


def test_caption_scores_tokenizes_and_reports_all_keys() -> None:
    cands = {1: "A dog.", 2: "A cat, cat!", 3: "Red car"}
    refs = {1: ["a dog", "A cat."], 2: ["a cat"], 3: ['A "red" car']}
    scores = caption_scores(cands, refs)
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D", "tokenization"}
    assert isinstance(scores["tokenization"], str)
    # after tokenisation these are the captions of test_cider_d_by_hand: 2.93178
    assert scores["CIDEr-D"] == pytest.approx(cider_d({1: "a dog", 2: "a cat cat", 3: "red car"},
                                                      {1: ["a dog", "a cat"], 2: ["a cat"], 3: ["a red car"]}))  # fmt: skip
    assert scores["CIDEr-D"] == pytest.approx(2.93178, abs=1e-5)
    with pytest.raises(KeyError):
        caption_scores({1: "a"}, {2: ["a"]})


# =========================================================================================================
# Fox page OCR


def test_fox_precision_conventions_differ() -> None:
    pred = "the cat sat on the mat"
    gt = "the cat sat"
    # word sets: pred {the, cat, sat, on, mat} (5), gt {the, cat, sat} (3), intersection 3
    s = ocr_scores(pred, gt, "en")
    assert s["precision"] == pytest.approx(3 / 5)  # standard: |pred ∩ gt| / |pred|
    assert s["precision_fox_official"] == pytest.approx(3 / 3)  # official script: / |gt|
    assert s["recall"] == pytest.approx(1.0)
    assert s["recall_fox_official"] == pytest.approx(3 / 5)
    assert s["f1"] == pytest.approx(2 * 0.6 * 1.0 / 1.6)  # 0.75, symmetric
    # characters: pred 22, gt 11, distance 11 (insert " on the mat") -> 0.5
    assert s["edit_distance"] == pytest.approx(0.5)
    assert s["one_minus_ned"] == pytest.approx(0.5)


def test_edit_distance_and_empty_pages() -> None:
    assert normalized_edit_distance("kitten", "sitting") == pytest.approx(3 / 7)  # k->s, e->i, +g
    assert normalized_edit_distance("", "") == 0.0
    s = ocr_scores("", "", "en")
    assert (s["precision"], s["recall"], s["f1"], s["edit_distance"]) == (1.0, 1.0, 1.0, 0.0)
    s = ocr_scores("", "some text", "en")
    assert (s["precision"], s["recall"], s["f1"], s["edit_distance"], s["bleu"]) == (0.0, 0.0, 0.0, 1.0, 0.0)


def test_sentence_bleu_by_hand_and_official_swap() -> None:
    pred = ["the", "quick", "brown", "fox", "jumps", "over", "the", "dog"]  # 8 words
    gt = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]  # 9 words
    # hypothesis = pred, reference = gt:
    #   p1 = 8/8 (the x2 allowed); p2 = 6/7 (not "the dog"); p3 = 5/6 (not "over the dog");
    #   p4 = 4/5 (not "jumps over the dog"); c = 8 < r = 9 -> BP = exp(1 - 9/8)
    expected = math.exp(1 - 9 / 8) * (1 * 6 / 7 * 5 / 6 * 4 / 5) ** 0.25  # = 0.882497 * (4/7)^0.25
    assert nltk_sentence_bleu([gt], pred) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.767279, abs=1e-6)
    # swapped (what eval_ocr_test.py computes): hypothesis = gt (9), reference = pred (8):
    #   p1 = 8/9 ("lazy"), p2 = 6/8, p3 = 5/7, p4 = 4/6; c = 9 > r = 8 -> BP = 1
    swapped = (8 / 9 * 6 / 8 * 5 / 7 * 4 / 6) ** 0.25  # = (960/3024)^0.25 = 0.750624
    s = ocr_scores(" ".join(pred), " ".join(gt), "en")
    assert s["bleu"] == pytest.approx(expected, rel=1e-12)
    assert s["bleu_fox_official"] == pytest.approx(swapped, rel=1e-12)
    # no smoothing: a zero 4-gram precision becomes sys.float_info.min (nltk method0) -> ~1e-77, not 0;
    # "the cat sat on the mat" vs "the cat sat": p = 3/6, 2/5, 1/4, 0/3; c = 6 > r = 3 -> BP 1
    tiny_bleu = nltk_sentence_bleu([["the", "cat", "sat"]], ["the", "cat", "sat", "on", "the", "mat"])
    manual = math.exp(0.25 * (math.log(0.5) + math.log(0.4) + math.log(0.25) + math.log(sys.float_info.min)))
    assert tiny_bleu == pytest.approx(manual, rel=1e-9) and 0 < tiny_bleu < 1e-70
    # no unigram match at all -> exactly 0
    assert nltk_sentence_bleu([["a", "b"]], ["c", "d"]) == 0.0


def test_chinese_words_use_jieba_and_corpus_means() -> None:
    text = "今天天气很好"
    segmented = words(text, "zh")
    assert "".join(segmented) == text and len(segmented) < len(text)  # words, not characters
    assert words("hello  world\n", "en") == ["hello", "world"]
    assert words(text, "auto") == segmented
    # official rule: jieba for both strings if either has CJK; identical pages -> perfect scores
    assert ocr_scores(text, text)["f1"] == 1.0
    records = [
        {"prediction": "the cat sat on the mat", "reference": "the cat sat"},  # precision 0.6, ned 0.5
        {"prediction": "a b", "reference": "a b"},  # precision 1, ned 0
    ]
    means = corpus_ocr_scores(records)
    assert means["pages"] == 2
    assert means["precision"] == pytest.approx((0.6 + 1.0) / 2)
    assert means["precision_fox_official"] == pytest.approx((1.0 + 1.0) / 2)
    assert means["edit_distance"] == pytest.approx((0.5 + 0.0) / 2)


def test_rouge_l_empty_captions_follow_pycocoevalcap() -> None:
    """pycocoevalcap's rouge.py splits each tokenised caption with ``split(" ")``, so an empty one is a
    single empty token: empty against empty gives LCS 1, P = R = 1 and F = 1 (it asserts nothing about
    empty captions); an empty caption against a non-empty one gives 0."""

    def lcs(a: list[str], b: list[str]) -> int:
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a, 1):
            for j, y in enumerate(b, 1):
                table[i][j] = table[i - 1][j - 1] + 1 if x == y else max(table[i - 1][j], table[i][j - 1])
        return table[-1][-1]

    def coco_rouge(cand: str, refs: list[str], beta: float = 1.2) -> float:  # rouge.py's arithmetic
        c, rs = cand.split(" "), [r.split(" ") for r in refs]
        p = max(lcs(r, c) / len(c) for r in rs)
        r = max(lcs(r, c) / len(r) for r in rs)
        return (1 + beta**2) * p * r / (r + beta**2 * p) if p and r else 0.0

    cases = {
        "both_empty": ("", [""]),
        "punctuation_only": (".", ["!"]),  # nothing left after tokenisation on either side
        "empty_cand_one_empty_ref": ("", ["a dog", ""]),
        "empty_cand": ("", ["a dog"]),
        "empty_ref_only": ("a cat", [""]),
        "one_empty_ref": ("a cat", ["", "a cat sat"]),
    }
    cands = {k: c for k, (c, _) in cases.items()}
    refs = {k: r for k, (_, r) in cases.items()}
    per = rouge_l_per_image(cands, refs)
    expected = {
        k: coco_rouge(" ".join(tokenize(c)), [" ".join(tokenize(r)) for r in rs])
        for k, (c, rs) in cases.items()
    }
    assert per == pytest.approx(expected)
    assert per["both_empty"] == per["punctuation_only"] == per["empty_cand_one_empty_ref"] == 1.0
    assert per["empty_cand"] == per["empty_ref_only"] == 0.0
    assert rouge_l({0: ""}, {0: [""]}, pretokenized=True) == 1.0
    assert rouge_l({0: "", 1: "zzz"}, {0: [""], 1: ["a b"]}) == 0.5
