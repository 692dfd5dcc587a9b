"""The byte-level BPE tokenizer of `llm=tiny` (llm.tokenizer=bpe): round trips, special tokens, training
once into a cache, and checkpoints that carry it to eval.py."""

import shutil

import pytest
import torch

from vlm import IMAGE_TOKEN
from vlm.app.run import evaluate_checkpoint, train
from vlm.checkpoint import UnreadableCheckpointError, read_lightning_checkpoint
from vlm.corpus import SPLITS, paragraphs_for
from vlm.models.llms import tokenizer as tokenizers
from vlm.models.llms.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    corpus_bpe_tokenizer,
    make_tokenizer,
    train_bpe,
)
from vlm.training.checkpointing import load_module
from vlm.training.module import VLMModule

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


def test_the_reading_losses_of_a_bpe_llm_predict_the_texts_bytes(bpe):
    """loss.aux_units=bytes (the default): the CTC and chunk heads of a BPE LLM target the UTF-8 bytes of
    the answer (257 classes, 256 the blank/padding); `llm` targets its token ids; the byte tokenizer's
    heads keep its own 260 ids either way."""
    from vlm import IGNORE_INDEX
    from vlm.training.aux_losses import ChunkHead, CTCHead, reading_targets, reading_units

    texts = ["naïve café, 3 × 4", "x"]
    rows = [[bpe.bos_id, *bpe.encode(text), bpe.eos_id] for text in texts]
    width = max(map(len, rows))
    labels = torch.full((2, width), IGNORE_INDEX)
    for i, row in enumerate(rows):
        labels[i, 1 : len(row)] = torch.tensor(row[1:])
    batch = {"labels": labels, "images_per_sample": torch.ones(2, dtype=torch.long)}

    as_bytes, classes, blank = reading_units("bytes", bpe)
    assert (as_bytes, classes, blank) == (True, 257, 256)
    got = reading_targets(batch, bpe, "loss.ctc_weight", as_bytes)
    assert [t.tolist() for t in got] == [list(text.encode("utf-8")) for text in texts]
    got = reading_targets(batch, bpe, "loss.ctc_weight", False)
    assert [t.tolist() for t in got] == [bpe.encode(text) for text in texts]

    assert CTCHead(8, 2, bpe).proj.out_features == 4 * 257
    assert ChunkHead(8, 4, bpe, units="llm").proj.out_features == 4 * VOCAB
    head = ChunkHead(8, 4, bpe)
    vision = torch.randn(2, 5, 8)
    loss = head.loss(vision, batch)  # 20 slots: the longer text's 20 bytes; the other's 1, then padding
    assert torch.isfinite(loss) and loss.item() > 0
    byte = ByteTokenizer()
    assert reading_units("bytes", byte) == reading_units("llm", byte) == (False, 260, byte.pad_id)
    with pytest.raises(ValueError, match=r"loss\.aux_units='chars'"):
        reading_units("chars", bpe)


def test_token_bytes_spell_every_text(bpe):
    """Each id's bytes (from its byte-level string) concatenate to the text's UTF-8, whatever the text."""
    spelled = bpe.token_bytes()
    assert len(spelled) == bpe.vocab_size and spelled[bpe.image_token_id] == b""
    for text in [paragraphs_for("test")[0], "naïve café 日本語 😀\t\r\n\x00\x7f  x"]:
        assert b"".join(spelled[i] for i in bpe.encode(text)) == text.encode("utf-8")
    assert ByteTokenizer().token_bytes()[:256] == [bytes([i]) for i in range(256)]


def test_the_spelled_head_scores_each_token_by_its_bytes(bpe):
    """SpelledHead: row v = free row + sum over v's first 8 bytes of byte embedding x position scale; two
    tokens share nothing but the bytes they share; a spelled head never grows."""
    from vlm.models.llms.gpt import GPT, SPELLED_BYTES, GPTConfig

    gpt = GPT(
        GPTConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_kv_head=2, n_embd=16, spelled_head=True), bpe
    )
    head = gpt.lm_head
    torch.nn.init.normal_(head.weight)
    torch.nn.init.normal_(head.byte_scale)
    table = head.table()
    spelled = bpe.token_bytes()
    v = max(range(VOCAB), key=lambda i: len(spelled[i]))  # the longest token
    padded = [*spelled[v][:SPELLED_BYTES], *[256] * (SPELLED_BYTES - len(spelled[v]))]
    expected = head.weight[v] + sum(
        head.byte_embed.weight[b] * head.byte_scale[k] for k, b in enumerate(padded)
    )
    assert torch.allclose(table[v], expected, atol=1e-5)
    x = torch.randn(3, 16)
    assert torch.allclose(head(x), x @ table.T, atol=1e-5)
    with pytest.raises(ValueError, match="spelled output head cannot grow"):
        gpt.grow_vocab(VOCAB + 1)
    loaded = GPT(gpt.config, bpe)
    loaded.load_state_dict(gpt.state_dict())  # strict: the spelling is rebuilt from the tokenizer, not saved
    assert torch.equal(loaded.lm_head.table(), table)
