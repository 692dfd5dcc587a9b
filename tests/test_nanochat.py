"""nanochat (llm=nanochat_d20|d32): the official fixture, strict weights-only loading, the tokenizer
(restricted unpickling, chat format, `<image>` row), and a training step through the configs."""

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import tiktoken
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.steps import make_batch, train_step
from vlm import IMAGE_TOKEN
from vlm.contracts import ImagePreprocessing
from vlm.data.processing import SampleProcessor
from vlm.models.llms.gpt import GPT, GPTConfig
from vlm.models.llms.nanochat import build_nanochat, load_checkpoint, load_tokenizer
from vlm.models.llms.tokenizer import (
    NANOCHAT_SPECIAL_TOKENS,
    ByteTokenizer,
    NanochatTokenizer,
    UnsafePickleError,
)
from vlm.models.pretrained import CheckpointMismatchError
from vlm.training.module import VLMModule

# made with the original nanochat code (fixtures/README.md); ../shared next to the repository
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "fixtures" / "nanochat"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"fixture {FIXTURE} not on this machine")
FIXTURE_CONFIG = {
    "sequence_len": 64,
    "vocab_size": 320,
    "n_layer": 2,
    "n_head": 4,
    "n_kv_head": 4,
    "n_embd": 128,
}


# -- helpers: checkpoints and tokenizers in nanochat's layout ---------------------------------------
def write_checkpoint(directory: Path, state: dict, model_config: dict, step: int = 0) -> Path:
    """model_<step>.pt + meta_<step>.json as nanochat writes them (wte in bf16, the rest fp32)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / f"model_{step:06d}.pt")
    meta = {"step": step, "model_config": model_config}
    (directory / f"meta_{step:06d}.json").write_text(json.dumps(meta))
    return directory


def nanochat_state(model: GPT) -> dict:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["transformer.wte.weight"] = state["transformer.wte.weight"].bfloat16()
    return state


def fixture_state() -> dict:
    return torch.load(FIXTURE / "model_000000.pt", map_location="cpu", weights_only=True)


SPLIT_PATTERN = r"""\s?\p{L}+|\s?\p{N}{1,2}|\s?[^\s\p{L}\p{N}]+|\s+"""
MERGES = [b"th", b"the", b" t", b" the", b"in", b"at", b" c", b" cat", b"er", b"an"]


def tiny_encoding() -> tiktoken.Encoding:
    """256 byte ranks, a few merges, nanochat's special tokens at the end of the vocabulary."""
    ranks = {bytes([i]): i for i in range(256)}
    for merge in MERGES:
        ranks[merge] = len(ranks)
    specials = {tok: len(ranks) + i for i, tok in enumerate(NANOCHAT_SPECIAL_TOKENS)}
    return tiktoken.Encoding("rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def write_tokenizer(directory: Path, protocol: int | None = None) -> Path:
    """tokenizer.pkl (pickle.dump of the Encoding, as nanochat saves it) and token_bytes.pt."""
    directory.mkdir(parents=True, exist_ok=True)
    encoding = tiny_encoding()
    with open(directory / "tokenizer.pkl", "wb") as f:
        pickle.dump(encoding, f, protocol=protocol)
    lengths = [len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab - 9)]
    torch.save(torch.tensor(lengths + [0] * 9, dtype=torch.int32), directory / "token_bytes.pt")
    return directory


class RunsACommand:
    """Unpickling this would run a shell command (creating `marker`)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ExecsCode(RunsACommand):
    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


# -- the official fixture ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixture_model() -> GPT:
    return build_nanochat(checkpoint=str(FIXTURE), **FIXTURE_CONFIG).eval()


@needs_fixture
def test_fixture_logits_and_loss(fixture_model):
    expected = load_file(FIXTURE / "expected.safetensors")
    ids = expected["input_ids"]
    # loaded into fp32; wte holds the checkpoint's bf16 values exactly
    wte = fixture_model.transformer.wte.weight
    assert wte.dtype == torch.float32 and torch.equal(wte, fixture_state()["transformer.wte.weight"].float())
    with torch.no_grad():
        logits = fixture_model(fixture_model.embed(ids))
    diff = (logits - expected["logits"]).abs().max().item()
    assert diff < 1e-4, diff
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert abs(loss.item() - expected["loss"].item()) < 1e-4


def greedy(model: GPT, prompt: torch.Tensor, steps: int, cached: bool) -> list[int]:
    ids = prompt[None]
    cache = model.new_kv_cache(1, len(prompt) + steps) if cached else None
    logits = model(model.embed(ids), kv_cache=cache)[:, -1]
    out = []
    for _ in range(steps):
        token = logits.argmax(-1, keepdim=True)
        out.append(int(token))
        if cached:
            logits = model(model.embed(token), kv_cache=cache)[:, -1]
        else:
            ids = torch.cat([ids, token], dim=1)
            logits = model(model.embed(ids))[:, -1]
    return out


@needs_fixture
@torch.no_grad()
def test_fixture_greedy_continuation(fixture_model):
    expected = load_file(FIXTURE / "expected.safetensors")
    want = expected["greedy_tokens"].tolist()
    assert greedy(fixture_model, expected["prompt_ids"], 10, cached=True) == want
    assert greedy(fixture_model, expected["prompt_ids"], 10, cached=False) == want


@needs_fixture
def test_config_sizes_that_differ_from_meta_are_named(caplog):
    with caplog.at_level(logging.WARNING):
        model = build_nanochat(checkpoint=str(FIXTURE), n_layer=32, n_embd=2048, n_head=16)
    assert model.config.n_layer == 2 and model.config.n_embd == 128  # meta's model_config wins
    assert "n_layer=32 (checkpoint: 2)" in caplog.text and "n_embd=2048 (checkpoint: 128)" in caplog.text


@needs_fixture
def test_bfloat16_backbone(fixture_model):
    model = build_nanochat(checkpoint=str(FIXTURE), dtype="bfloat16", **FIXTURE_CONFIG).eval()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = load_file(FIXTURE / "expected.safetensors")["input_ids"]
    with torch.no_grad():
        # fp32 embeddings (as a projector gives them) are accepted
        logits = model(fixture_model.embed(ids))
        reference = fixture_model(fixture_model.embed(ids))
    assert logits.dtype == torch.float32
    assert (logits - reference).abs().max() < 0.1  # measured 0.027


# -- strict, weights-only loading -------------------------------------------------------------------
@needs_fixture
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("transformer.h.1.mlp.c_fc.weight"), "missing: transformer.h.1.mlp.c_fc.weight"),
        (
            lambda s: s.update({"transformer.h.2.attn.c_q.weight": torch.zeros(128, 128)}),
            "unexpected: transformer.h.2.attn.c_q.weight",
        ),
        (
            lambda s: s.update({"transformer.h.0.attn.c_k.weight": torch.zeros(64, 128)}),
            "mis-shaped: transformer.h.0.attn.c_k.weight (checkpoint (64, 128), model (128, 128))",
        ),
    ],
    ids=["missing", "unexpected", "misshaped"],
)
def test_strict_loading_names_the_key(tmp_path, change, message):
    state = fixture_state()
    change(state)
    write_checkpoint(tmp_path, state, FIXTURE_CONFIG)
    with pytest.raises(CheckpointMismatchError) as error:
        load_checkpoint(str(tmp_path))
    assert message in str(error.value)


@needs_fixture
def test_compiled_prefix_and_step_choice(tmp_path, fixture_model):
    state = fixture_state()
    write_checkpoint(tmp_path, {f"_orig_mod.{k}": v for k, v in state.items()}, FIXTURE_CONFIG, step=5)
    write_checkpoint(tmp_path, {**state, "lm_head.weight": torch.zeros(320, 128)}, FIXTURE_CONFIG, step=3)
    latest = load_checkpoint(str(tmp_path))  # step 5, torch.compile's names
    assert torch.equal(latest.lm_head.weight, fixture_model.lm_head.weight)
    assert latest.lm_head.weight.abs().sum() > 0
    assert not load_checkpoint(str(tmp_path), step=3).lm_head.weight.any()
    with pytest.raises(FileNotFoundError, match="no step 4; its steps: 3, 5"):
        load_checkpoint(str(tmp_path), step=4)


def test_checkpoint_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no meta_<step>\.json"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_checkpoint(str(tmp_path / "absent"))
    # a Hub id, offline (tests set HF_HUB_OFFLINE=1) and not in the cache
    with pytest.raises(FileNotFoundError, match="not in the Hub cache"):
        load_checkpoint("nobody-here/no-such-nanochat-checkpoint")


def test_checkpoint_is_read_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    model = GPT(GPTConfig(sequence_len=16, vocab_size=260, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    state = {**nanochat_state(model), "transformer.h.0.attn.c_q.weight": RunsACommand(marker)}
    write_checkpoint(
        tmp_path, state, dict(sequence_len=16, vocab_size=260, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    )
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(str(tmp_path))
    assert not marker.exists()


# -- tokenizer ---------------------------------------------------------------------------------------
@pytest.fixture
def tokenizer_dir(tmp_path) -> Path:
    return write_tokenizer(tmp_path / "tokenizer")


def test_tokenizer_round_trip_and_specials(tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    encoding = tiny_encoding()
    text = "the cat sat in the hat, 1234 times: ünïcödé ✓\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and ids == encoding.encode_ordinary(text)
    assert encoding.encode_single_token(" the") in ids  # the merges are used

    special = {name: encoding.encode_single_token(name) for name in NANOCHAT_SPECIAL_TOKENS}
    assert tok.bos_id == tok.pad_id == special["<|bos|>"] == 256 + len(MERGES)
    assert tok.eos_id == special["<|assistant_end|>"]
    assert tok.stop_ids == [special["<|assistant_end|>"], special["<|bos|>"]]
    assert ByteTokenizer().stop_ids == [ByteTokenizer().eos_id]
    for name, token_id in special.items():
        assert tok.encode(name) == [token_id]
    # <image> is a new last id, never produced by encode
    assert tok.image_token_id == encoding.n_vocab and tok.vocab_size == encoding.n_vocab + 1
    assert tok.image_token_id not in tok.encode(f"a {IMAGE_TOKEN} b")
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.image_token_id, tok.eos_id]) == "hi"

    # the chat format as the data code uses it: specials as ids, <image> expanded to placeholders
    prompt = tok.format_prompt(f"{IMAGE_TOKEN}\nRead.")
    assert prompt == f"<|user_start|>{IMAGE_TOKEN}\nRead.<|user_end|><|assistant_start|>"
    processor = SampleProcessor(tok, ImagePreprocessing(size=(32, 64)), vision_tokens_per_image=3)
    ids = processor.encode_prompt(f"{IMAGE_TOKEN}\nRead.", 1)
    assert ids[:5] == [tok.bos_id, special["<|user_start|>"], *[tok.image_token_id] * 3]
    assert ids[-2:] == [special["<|user_end|>"], special["<|assistant_start|>"]]
    assert tok.decode(ids) == "\nRead."


def test_tokenizer_loads_from_every_pickle_protocol(tmp_path):
    text = "the cat<|user_end|>"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        tok = load_tokenizer(str(write_tokenizer(tmp_path / str(protocol), protocol)))
        assert tok.encode(text) == tiny_encoding().encode(text, allowed_special="all")


@pytest.mark.parametrize("payload", [RunsACommand, ExecsCode])
def test_malicious_tokenizer_pickle_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    (tmp_path / "tok").mkdir()
    with open(tmp_path / "tok" / "tokenizer.pkl", "wb") as f:
        pickle.dump(payload(marker), f)
    with pytest.raises(UnsafePickleError, match=r"refers to (posix|builtins)\.(system|exec)"):
        load_tokenizer(str(tmp_path / "tok"))
    assert not marker.exists()


def test_tokenizer_pickle_must_be_an_encoding(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.pkl").write_bytes(pickle.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="not a pickled tiktoken Encoding"):
        load_tokenizer(str(tmp_path / "tok"))
    plain = tiktoken.Encoding(
        "x",
        pat_str=SPLIT_PATTERN,
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|bos|>": 256},
    )
    with pytest.raises(ValueError, match=r"lacks nanochat's special tokens <\|user_start\|>"):
        NanochatTokenizer(plain)


def test_image_row_is_added_and_old_rows_are_kept(tmp_path, tokenizer_dir):
    encoding = tiny_encoding()
    config = dict(sequence_len=32, vocab_size=encoding.n_vocab, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    source = GPT(GPTConfig(**config))
    torch.nn.init.normal_(source.lm_head.weight)
    state = nanochat_state(source)
    write_checkpoint(tmp_path / "ckpt", state, config)

    plain = load_checkpoint(str(tmp_path / "ckpt"))
    model = build_nanochat(checkpoint=str(tmp_path / "ckpt"), tokenizer=str(tokenizer_dir))
    n = encoding.n_vocab
    assert model.tokenizer.image_token_id == n and model.config.vocab_size == n + 1
    wte, head = model.transformer.wte.weight, model.lm_head.weight
    assert wte.shape == (n + 1, 32) and head.shape == (n + 1, 32)
    assert torch.equal(wte[:n], state["transformer.wte.weight"].float())
    assert torch.equal(head[:n], state["lm_head.weight"])
    assert not head[n].any() and torch.isfinite(wte[n]).all()
    ids = torch.tensor([model.tokenizer.encode("the cat")])
    with torch.no_grad():
        grown, before = model(model.embed(ids)), plain(plain.embed(ids))
    # the old logits are unchanged (up to the matmul's blocking for a different row count)
    assert torch.allclose(grown[..., :n], before, rtol=0, atol=1e-5) and not grown[..., n].any()


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = build_nanochat(n_layer=2, n_embd=32, n_head=2, vocab_size=260, sequence_len=32)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    embeds = torch.randn(2, 8, 32)
    grads = []
    for enabled in (False, True):
        model.set_activation_checkpointing(enabled)
        model.zero_grad()
        model(embeds).square().mean().backward()
        grads.append([p.grad.clone() for p in model.transformer.h.parameters()])
    assert all(torch.allclose(a, b) for a, b in zip(*grads, strict=True))


# -- a training step through the configs ------------------------------------------------------------
def train_one_step(module: VLMModule) -> None:
    model = module.model
    batch = make_batch(model, ["the cat 0", "the cat 1"])
    assert (batch["input_ids"] == model.tokenizer.image_token_id).sum() == 2 * model.vision_tokens_per_image
    assert any(name.startswith("projector.") for name in train_step(module, batch))


def test_nanochat_d32_trains_a_step_at_test_sizes(make_cfg):
    torch.manual_seed(0)
    module = VLMModule(make_cfg("llm=nanochat_d32", "llm.activation_checkpointing=true"))
    llm = module.model.llm
    assert isinstance(llm, GPT) and isinstance(llm.tokenizer, ByteTokenizer)
    assert (llm.config.n_layer, llm.config.n_embd, llm.config.vocab_size) == (2, 64, 260)
    assert llm.checkpointing
    train_one_step(module)


def test_nanochat_trains_a_step_from_a_checkpoint_and_tokenizer(make_cfg, tmp_path, tokenizer_dir):
    encoding = tiny_encoding()
    config = dict(sequence_len=256, vocab_size=encoding.n_vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    torch.manual_seed(0)
    write_checkpoint(tmp_path / "ckpt", nanochat_state(GPT(GPTConfig(**config))), config, step=7)
    module = VLMModule(
        make_cfg("llm=nanochat_d32", f"llm.checkpoint={tmp_path / 'ckpt'}", f"llm.tokenizer={tokenizer_dir}")
    )
    tok = module.model.tokenizer
    assert isinstance(tok, NanochatTokenizer) and tok.image_token_id == encoding.n_vocab
    assert module.model.llm.config.vocab_size == encoding.n_vocab + 1
    train_one_step(module)
    shutil.rmtree(tmp_path / "ckpt")
