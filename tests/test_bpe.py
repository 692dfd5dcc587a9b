"""The byte-level BPE tokenizer of `llm=tiny` (llm.tokenizer=bpe): round trips, special tokens, training
once into a cache, and checkpoints that carry it to eval.py."""

import shutil

import pytest
import torch

from vlm import IMAGE_TOKEN
from vlm.checkpoint import UnreadableCheckpointError, load_module, read_lightning_checkpoint
from vlm.data.corpus import SPLITS, paragraphs_for
from vlm.models.llms import tokenizer as tokenizers
from vlm.models.llms.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    corpus_bpe_tokenizer,
    make_tokenizer,
    train_bpe,
)
from vlm.training.module import VLMModule
from vlm.training.run import evaluate_checkpoint, train

VOCAB = 512  # small, so training takes a fraction of a second


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> BPETokenizer:
    return corpus_bpe_tokenizer(VOCAB, tmp_path_factory.mktemp("tokenizers"))


def test_round_trips_the_whole_corpus_and_any_text(bpe):
    assert bpe.vocab_size == VOCAB
    corpus = [p for split in SPLITS for p in paragraphs_for(split)]
    assert all(bpe.decode(bpe.encode(text)) == text for text in corpus)
    characters = "".join(sorted(set("".join(corpus))))
    assert bpe.decode(bpe.encode(characters)) == characters
    unseen = "naïve café 日本語 😀\t\r\n\x00\x7f  trailing "
    assert bpe.decode(bpe.encode(unseen)) == unseen
    assert bpe.decode([*bpe.encode("é")[:1], -1, VOCAB]) == "\ufffd"  # half a character, ids outside
    assert len(bpe.encode(corpus[0])) < len(corpus[0]) / 1.5  # merges: fewer tokens than bytes


def test_special_tokens_come_last_and_never_from_text(bpe):
    special = [bpe.bos_id, bpe.eos_id, bpe.pad_id, bpe.image_token_id]
    assert special == list(range(VOCAB - 4, VOCAB)) and bpe.stop_ids == [bpe.eos_id]
    for tokenizer in (ByteTokenizer(), bpe):
        for name in tokenizer.special_tokens:
            text = f"a {name} b{name}"
            ids = tokenizer.encode(text)
            assert not set(ids) & set(special if tokenizer is bpe else range(256, 260))
            assert tokenizer.decode(ids) == text
    ids = bpe.encode("ab")
    assert bpe.decode([bpe.bos_id, ids[0], bpe.image_token_id, *ids[1:], bpe.eos_id]) == "ab"
    assert bpe.format_prompt(f"{IMAGE_TOKEN}\nRead.") == f"{IMAGE_TOKEN}\nRead."
    assert BPETokenizer.from_json(bpe.to_json()).encode(IMAGE_TOKEN) == bpe.encode(IMAGE_TOKEN)


def test_training_is_deterministic(bpe, tmp_path):
    texts = paragraphs_for("train")
    assert train_bpe(texts, VOCAB).to_json() == train_bpe(texts, VOCAB).to_json() == bpe.to_json()
    with pytest.raises(ValueError, match="at least 260 ids"):
        train_bpe(texts, 259)


def test_trained_once_then_read_from_the_cache(tmp_path, monkeypatch):
    first = corpus_bpe_tokenizer(VOCAB, tmp_path)
    (file,) = tmp_path.iterdir()  # no temporary file left behind
    assert file.name.startswith(f"bpe-{VOCAB}-") and len(file.stem) == len(f"bpe-{VOCAB}-") + 12
    assert file.read_text(encoding="utf-8") == first.to_json()

    def no_training(*args):
        raise AssertionError("trained again instead of reading the cache")

    monkeypatch.setattr(tokenizers, "train_bpe", no_training)
    assert corpus_bpe_tokenizer(VOCAB, tmp_path).to_json() == first.to_json()
    with pytest.raises(AssertionError, match="trained again"):
        corpus_bpe_tokenizer(VOCAB + 1, tmp_path)  # another size: another file


@pytest.mark.parametrize("name", ["bytes", "bpe"])
def test_the_model_vocabulary_follows_the_tokenizer(make_cfg, tmp_path, name):
    cfg = make_cfg(
        f"llm.tokenizer={name}", f"llm.tokenizer_vocab_size={VOCAB}", f"llm.tokenizer_dir={tmp_path}"
    )
    module = VLMModule(cfg)
    tokenizer, llm = module.model.tokenizer, module.model.llm
    assert isinstance(tokenizer, {"bytes": ByteTokenizer, "bpe": BPETokenizer}[name])
    assert llm.config.vocab_size == tokenizer.vocab_size == {"bytes": 260, "bpe": VOCAB}[name]
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint == ({"tokenizer": tokenizer.to_json()} if name == "bpe" else {})


def test_an_unknown_tokenizer_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"llm.tokenizer='words' is not a tokenizer; expected bytes or bpe"):
        make_tokenizer("words", VOCAB, tmp_path)


def test_a_bpe_checkpoint_is_evaluated_without_the_tokenizer_cache(make_cfg, tmp_path):
    cache = tmp_path / "tokenizers"
    bpe = ["llm.tokenizer=bpe", f"llm.tokenizer_vocab_size={VOCAB}", f"llm.tokenizer_dir={cache}"]
    train(make_cfg(*bpe, "trainer.max_steps=2", "trainer.val_check_interval=2", "test=false"))
    file = next((tmp_path / "run" / "checkpoints").glob("step*.ckpt"))
    trained = next(cache.glob("*.json")).read_text(encoding="utf-8")
    shutil.rmtree(cache)

    checkpoint = read_lightning_checkpoint(file)  # weights-only
    assert checkpoint["tokenizer"] == trained
    module = load_module(file, checkpoint)
    assert module.model.tokenizer.to_json() == trained and not cache.exists()
    eval_cfg = make_cfg(
        f"ckpt_path={file}", "benchmark.limit=8", f"hydra.run.dir={tmp_path / 'eval'}", config="eval"
    )
    metrics = evaluate_checkpoint(eval_cfg)
    assert metrics["samples"] == 8 and metrics["cer"] >= 0 and not cache.exists()

    checkpoint["tokenizer"] = "{}"
    with pytest.raises(UnreadableCheckpointError, match="saved tokenizer is not a BPE tokenizer's JSON"):
        load_module(file, checkpoint)
    torch.save({**checkpoint, "tokenizer": trained}, tmp_path / "copy.ckpt")
    assert load_module(tmp_path / "copy.ckpt").model.llm.config.vocab_size == VOCAB
