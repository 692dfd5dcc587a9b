"""One accounting of text (vlm.text_accounting): counts per tokenizer equal the tokenizer files' own,
BPE files are checked by their SHA-256, and every benchmark takes the list of reference tokenizers."""

import shutil
from types import SimpleNamespace

import pytest
from hydra.utils import instantiate

from tests.test_eval_benchmarks import DEMO, needs_demo, run_eval
from vlm.config import CONFIG_DIR, compose
from vlm.models.llms.tokenizer import ByteTokenizer
from vlm.text_accounting import (
    KNOWN_BPE,
    REFERENCE_DIR,
    TextAccounting,
    install,
    llm_tokenizer_name,
    reference_counter,
)

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing\t\ttabs \n\nand new lines\n",
    "numbers 1234567 and 3.14159, it's we'll they've",
    "naïve café, Ελληνικά, 中文字符, emoji 🙂 and accents é",
    "",
]
GPT2 = REFERENCE_DIR / KNOWN_BPE["gpt2"].file


def test_gpt2_counts_equal_tiktokens_own_encoding_of_the_file(tmp_path, monkeypatch):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # tiktoken's loader caches what it reads
    ranks = load_tiktoken_bpe(str(GPT2), expected_hash=KNOWN_BPE["gpt2"].sha256)
    encoding = tiktoken.Encoding("r50k_base", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={})
    accounting = TextAccounting(None, ["gpt2"])
    for text in TEXTS:
        assert accounting.count(text)["tokens_gpt2"] == len(encoding.encode_ordinary(text)), text
    assert accounting.count("Hello world")["tokens_gpt2"] == 2  # GPT-2: "Hello", " world"
    assert len(ranks) == 50256  # r50k_base: 50,256 merges + <|endoftext|>


def test_a_tiktoken_file_is_known_by_its_checksum_wherever_it_is(tmp_path):
    copy = tmp_path / "any_name.tiktoken"
    shutil.copy(GPT2, copy)
    name, count = reference_counter(str(copy))
    assert name == "gpt2" and count(TEXTS[1]) == reference_counter("gpt2")[1](TEXTS[1])


def test_a_damaged_or_unknown_bpe_file_is_refused_by_name(tmp_path):
    damaged = tmp_path / KNOWN_BPE["gpt2"].file
    lines = GPT2.read_text().splitlines()
    damaged.write_text(
        "\n".join([*lines[:100], lines[101], lines[100], *lines[102:]]) + "\n"
    )  # 2 ranks swapped
    with pytest.raises(
        ValueError, match=rf"{damaged}: SHA-256 .* not the expected {KNOWN_BPE['gpt2'].sha256}"
    ):
        reference_counter("gpt2", tmp_path)
    unknown = tmp_path / "mine.tiktoken"
    unknown.write_text("IQ== 0\n")
    with pytest.raises(ValueError, match=r"mine\.tiktoken: not a known BPE file .* known: gpt2"):
        reference_counter(str(unknown))
    with pytest.raises(FileNotFoundError, match=r"cl100k_base\.tiktoken does not exist; no package known"):
        reference_counter("cl100k", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"gpt2\.tiktoken does not exist; make install"):
        reference_counter("gpt2", tmp_path / "empty")


def test_install_keeps_a_file_whose_checksum_is_right():
    assert install("gpt2") == GPT2  # already there: nothing downloaded


def test_hf_tokenizer_counts_equal_the_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "quick", "brown", "fox", ".", "hello", "world"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    directory = tmp_path / "Tiny-Words"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(directory)
    from_file = Tokenizer.from_file(str(directory / "tokenizer.json"))
    accounting = TextAccounting(None, [str(directory)])
    assert accounting.names == ["tiny_words"]
    for text in [*TEXTS, "the quick brown fox . hello world"]:
        assert accounting.count(text)["tokens_tiny_words"] == len(from_file.encode(text).ids), text


def test_counts_ratios_and_names():
    accounting = TextAccounting(ByteTokenizer(), ["bytes"])
    assert accounting.names == ["llm_bytes", "bytes"]
    counts = accounting.count("héllo €")
    assert counts == {"chars": 7, "bytes": 10, "tokens_llm_bytes": 10, "tokens_bytes": 10}
    assert accounting.ratios(counts, 4) == {
        "chars_per_vision_token": 7 / 4,
        "compression_llm_bytes": 10 / 4,
        "compression_bytes": 10 / 4,
    }
    with pytest.raises(ValueError, match="two tokenizers named 'bytes'"):
        TextAccounting(None, ["bytes", "bytes"])


class Named:
    name = "BPE 8192"

    def encode(self, text: str) -> list[int]:
        return [0] * len(text.split())


class WordsTokenizer:
    vocab_size = 1000

    def encode(self, text: str) -> list[int]:
        return [0] * len(text.split())


def test_the_llm_tokenizer_is_named_by_what_it_is():
    assert llm_tokenizer_name(ByteTokenizer()) == "llm_bytes"
    assert llm_tokenizer_name(Named()) == "llm_bpe_8192"
    assert llm_tokenizer_name(WordsTokenizer()) == "llm_words1000"
    hub = WordsTokenizer()
    hub.hf = SimpleNamespace(name_or_path="Qwen/Qwen2.5-0.5B")
    assert llm_tokenizer_name(hub) == "llm_qwen2_5_0_5b"
    assert TextAccounting(Named(), []).count("two words")["tokens_llm_bpe_8192"] == 2


BENCHMARKS = sorted(path.stem for path in (CONFIG_DIR / "benchmark").glob("*.yaml"))


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_every_benchmark_takes_the_list(benchmark, tmp_path):
    def built(config: str, *overrides: str):
        run = f"hydra.run.dir={tmp_path}"
        return instantiate(compose(config, [run, f"benchmark={benchmark}", *overrides]).benchmark)

    assert built("eval").tokenizers == ["bytes", "gpt2"]  # reference_tokenizers of conf/eval.yaml
    assert built("eval", "benchmark.tokenizers=[bytes]").tokenizers == ["bytes"]
    assert built("train", "reference_tokenizers=[gpt2]").tokenizers == ["gpt2"]  # set once for all


@needs_demo
def test_omnidocbench_counts_the_ground_truth_text_per_vision_token(tmp_path, data_dir):
    metrics, _ = run_eval(
        tmp_path,
        data_dir,
        "benchmark=omnidocbench",
        f"benchmark.gt={DEMO / 'OmniDocBench_demo.json'}",
        f"predictions={DEMO / 'predictions'}",
        "benchmark.vision_tokens=100",
    )
    assert metrics["mean_chars"] > 100 and metrics["mean_tokens_gpt2"] < metrics["mean_bytes"]
    assert metrics["chars_per_vision_token"] == pytest.approx(metrics["mean_chars"] / 100)
    assert metrics["compression_gpt2"] == pytest.approx(metrics["mean_tokens_gpt2"] / 100)
