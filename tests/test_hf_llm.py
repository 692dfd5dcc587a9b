"""Hugging Face causal LM backbones (llm=smollm2_*|qwen2_5_*): tiny Llama and Qwen2 checkpoints written
with save_pretrained, loaded strictly through build_hf_llm, checked against transformers' own forward,
with a KV cache, left padding, the `<image>` token, and one training step inside the VLM."""

import shutil

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from tests.steps import make_batch, train_step
from vlm import IMAGE_TOKEN
from vlm.contracts import ImagePreprocessing
from vlm.data.processing import SampleProcessor
from vlm.generation import generate
from vlm.models.llms.hf import HFCausalLM, build_hf_llm
from vlm.models.llms.tokenizer import build_bytes_tokenizer
from vlm.models.pretrained import CheckpointMismatchError
from vlm.training.module import VLMModule

BYTES_TOKENS = 259  # 256 bytes + <|endoftext|>, <|im_start|>, <|im_end|>; <image> makes 260
# the Llama checkpoint ties its head to the embedding (as SmolLM2), the Qwen2 one does not
TIE = {"llama": True, "qwen2": False}
LAYERS = {"llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer"}
# fresh one-layer models (vocab_size left out: the tokenizer's, <image> included)
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def tiny_hf_model(model_type: str):
    config = AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=BYTES_TOKENS,  # no row for <image>: the wrapper has to grow the embedding
        tie_word_embeddings=TIE[model_type],
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module", params=list(TIE))
def checkpoint(request, tmp_path_factory):
    """(directory written by save_pretrained with the byte tokenizer, the transformers model in it)."""
    torch.manual_seed(0)
    model = tiny_hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    build_bytes_tokenizer().save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def llm(checkpoint) -> HFCausalLM:
    return build_hf_llm(pretrained=str(checkpoint[0])).eval()


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_equal_the_transformers_forward(checkpoint, llm):
    _, reference = checkpoint
    ids = random_ids(2, 11)
    ours = llm(llm.embed(ids))
    assert ours.dtype == torch.float32 and ours.shape == (2, 11, BYTES_TOKENS + 1)
    torch.testing.assert_close(ours[..., :BYTES_TOKENS], reference(input_ids=ids).logits, rtol=0, atol=1e-6)
    model_type = reference.config.model_type
    assert [cls.__name__ for cls in llm.block_classes] == [LAYERS[model_type]]
    assert llm.hidden_size == 64


@pytest.mark.parametrize("strided", [False, True], ids=["positions", "strided_positions"])
@torch.no_grad()
def test_cached_decoding_equals_one_forward(llm, strided):
    ids = random_ids(2, 12, seed=1)
    # strided: positions jump as the VLM's vision tokens make them (by 4 over the first 6 tokens)
    steps = torch.tensor([4] * 6 + [1] * 6)
    positions = (steps.cumsum(0) - steps).expand(2, -1) if strided else None
    full = llm(llm.embed(ids), position_ids=positions)

    cache = llm.new_kv_cache(2, 12)
    pieces = [
        llm(
            llm.embed(ids[:, :6]),
            kv_cache=cache,
            position_ids=None if positions is None else positions[:, :6],
        )
    ]
    for i in range(6, 12):
        step_positions = None if positions is None else positions[:, i : i + 1]
        pieces.append(llm(llm.embed(ids[:, i : i + 1]), kv_cache=cache, position_ids=step_positions))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    if strided:  # the jumps are positions, not sequence boundaries: the last token still sees the first
        changed = ids.clone()
        changed[:, 0] = (changed[:, 0] + 1) % 256
        assert not torch.allclose(llm(llm.embed(changed), position_ids=positions)[:, -1], full[:, -1])


@torch.no_grad()
def test_left_padding_changes_nothing(llm):
    long, short = random_ids(1, 9, seed=2)[0], random_ids(1, 5, seed=3)[0]
    pad = llm.tokenizer.pad_id
    batch = torch.stack([long, torch.cat([torch.full((4,), pad), short])])
    mask = torch.tensor([[1] * 9, [0] * 4 + [1] * 5])
    cache = llm.new_kv_cache(2, 10)
    padded = llm(llm.embed(batch), attention_mask=mask, kv_cache=cache)
    torch.testing.assert_close(padded[1, -1], llm(llm.embed(short[None]))[0, -1], rtol=0, atol=1e-5)
    torch.testing.assert_close(padded[0], llm(llm.embed(long[None]))[0], rtol=0, atol=1e-5)
    # one cached step after the padded prompt, as generation does it
    token = torch.tensor([[7], [8]])
    step = llm(
        llm.embed(token),
        attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
        kv_cache=cache,
    )
    alone = llm(llm.embed(torch.cat([short, token[1]])[None]))
    torch.testing.assert_close(step[1, -1], alone[0, -1], rtol=0, atol=1e-5)


def test_image_token_is_added_and_old_rows_stay(checkpoint, llm):
    _, reference = checkpoint
    tok = llm.tokenizer
    assert tok.image_token_id == BYTES_TOKENS and tok.vocab_size == BYTES_TOKENS + 1
    pairs = [(llm.model.get_input_embeddings().weight, reference.get_input_embeddings().weight)]
    head = llm.model.get_output_embeddings().weight
    if reference.config.tie_word_embeddings:
        assert head is pairs[0][0]
    else:
        pairs.append((head, reference.get_output_embeddings().weight))
    for ours, old in pairs:
        assert ours.shape == (BYTES_TOKENS + 1, 64)
        assert torch.equal(ours[:BYTES_TOKENS], old)  # bit-identical
        torch.testing.assert_close(ours[BYTES_TOKENS], old.mean(0))


def test_padded_vocabulary_is_not_resized(tmp_path):
    """Qwen2.5 pads its embedding past the tokenizer's ids: `<image>` takes the next free row."""
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("qwen2", **SMALL, vocab_size=300, tie_word_embeddings=True)
    )
    model.save_pretrained(tmp_path)
    build_bytes_tokenizer().save_pretrained(tmp_path)
    llm = build_hf_llm(pretrained=str(tmp_path))
    ours, old = llm.model.get_input_embeddings().weight, model.get_input_embeddings().weight
    assert ours.shape == (300, 32) and llm.tokenizer.image_token_id == BYTES_TOKENS
    others = torch.arange(300) != BYTES_TOKENS
    assert torch.equal(ours[others], old[others])
    torch.testing.assert_close(ours[BYTES_TOKENS], old[:BYTES_TOKENS].mean(0))


def test_loading_is_strict(checkpoint, tmp_path):
    source, _ = checkpoint
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.extra.weight"] = torch.zeros(3)
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as error:
        build_hf_llm(pretrained=str(broken))
    message = str(error.value)
    assert "missing: model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected: model.layers.0.extra.weight" in message
    assert "mis-shaped: model.norm.weight (checkpoint (65,), model (64,))" in message


def test_bfloat16_weights_give_float32_logits(checkpoint, llm):
    bf16 = build_hf_llm(pretrained=str(checkpoint[0]), dtype="bfloat16").eval()
    assert bf16.model.get_input_embeddings().weight.dtype == torch.bfloat16
    ids = random_ids(1, 6, seed=4)
    with torch.no_grad():
        logits = bf16(llm.embed(ids))  # float32 embeddings are cast to the weights' dtype
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, llm(llm.embed(ids)), rtol=0.1, atol=0.1)
    with pytest.raises(ValueError, match="float32, bfloat16"):
        build_hf_llm(pretrained=str(checkpoint[0]), dtype="float16")


def test_activation_checkpointing_gives_the_same_gradients(checkpoint):
    grads = []
    for enabled in (False, True):
        llm = build_hf_llm(pretrained=str(checkpoint[0]), activation_checkpointing=enabled).train()
        assert llm.model.is_activation_checkpointing == enabled
        llm(llm.embed(random_ids(2, 8, seed=5))).square().mean().backward()
        grads.append([p.grad.clone() for p in llm.parameters()])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, checkpointed, rtol=1e-5, atol=1e-7)


def test_chat_template_keeps_image_and_stops_at_end_of_turn():
    llm = build_hf_llm(config={"model_type": "llama", **SMALL}, tokenizer="bytes")
    tok = llm.tokenizer
    prompt = tok.format_prompt(f"{IMAGE_TOKEN}\nRead the text.")
    assert prompt == f"<|im_start|>user\n{IMAGE_TOKEN}\nRead the text.<|im_end|>\n<|im_start|>assistant\n"
    im_end = tok.hf.convert_tokens_to_ids("<|im_end|>")
    assert tok.stop_ids == [tok.eos_id, im_end]
    assert tok.eos_id == tok.hf.convert_tokens_to_ids("<|endoftext|>")
    assert tok.bos_id is None and tok.pad_id == tok.eos_id and tok.vocab_size == 260
    # chat template tokens are single ids; a literal <image> in text is text, never the placeholder
    ids = tok.encode(f"<|im_start|>a{IMAGE_TOKEN}é")
    assert ids[0] == tok.hf.convert_tokens_to_ids("<|im_start|>") and tok.image_token_id not in ids
    assert tok.decode(ids) == f"a{IMAGE_TOKEN}é"
    assert tok.decode([*tok.encode("hi"), tok.image_token_id, tok.eos_id]) == "hi"

    # no BOS: the prompt starts with the template; each <image> becomes the placeholders
    processor = SampleProcessor(tok, ImagePreprocessing(size=(32, 32)), vision_tokens_per_image=3)
    prompt_ids = processor.encode_prompt("Read.", num_images=1)
    assert prompt_ids[0] == tok.hf.convert_tokens_to_ids("<|im_start|>")
    assert prompt_ids.count(tok.image_token_id) == 3

    without = build_hf_llm(
        config={"model_type": "qwen2", **SMALL},
        tokenizer="bytes",
        chat_template=False,
    ).tokenizer
    assert without.format_prompt("x <image>") == "x <image>" and without.stop_ids == [without.eos_id]


def test_uncached_hub_id_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"not in the Hub cache.*HF_HUB_OFFLINE.*local directory"):
        build_hf_llm(pretrained="vlm-tests/no-such-model")
    with pytest.raises(ValueError, match="need a tokenizer"):
        build_hf_llm(config={"model_type": "llama"})


@pytest.mark.parametrize("option", ["smollm2_135m", "qwen2_5_0_5b"])
def test_vlm_with_tiny_hf_llm_trains_a_step(make_cfg, option):
    cfg = make_cfg(f"llm={option}", "loss.ctc_weight=0", "loss.chunk_weight=0")
    assert cfg.llm.pretrained is None and cfg.llm.option == f"llm={option}"
    torch.manual_seed(0)
    module = VLMModule(cfg)
    model = module.model
    assert isinstance(model.llm, HFCausalLM)
    assert model.llm.model.config.model_type == ("llama" if option.startswith("smollm2") else "qwen2")
    batch = make_batch(model, ["ab", "abab"])
    assert any(name.startswith("projector.") for name in train_step(module, batch))

    # generation from left-padded prompts with strided vision positions: the cache changes nothing
    module.eval()
    args = (model, batch["prompt_ids"], batch["prompt_mask"], batch["pixel_values"], 4)
    cached = generate(*args, stop_ids=[-1])
    assert cached == generate(*args, stop_ids=[-1], use_cache=False)


def test_saved_checkpoint_trains_a_step_with_an_encoder(make_cfg, checkpoint):
    """The checkpoint directory (Llama tied / Qwen2 untied), loaded through the llm config's own
    path (`llm.pretrained=<dir>`), trains with an encoder; generation is batched and cached."""
    directory, reference = checkpoint
    option = "smollm2_135m" if reference.config.model_type == "llama" else "qwen2_5_0_5b"
    module = VLMModule(
        make_cfg(f"llm={option}", f"llm.pretrained={directory}", "llm.config=null", "llm.tokenizer=null")
    )
    llm = module.model.llm
    assert llm.model.config.num_hidden_layers == 2 and llm.hidden_size == 64
    assert torch.equal(
        llm.model.model.layers[1].mlp.up_proj.weight, reference.model.layers[1].mlp.up_proj.weight
    )
    batch = make_batch(module.model, ["ab", "abcabc"])
    assert any(name.startswith("projector.") for name in train_step(module, batch))
    module.eval()
    args = (module.model, batch["prompt_ids"], batch["prompt_mask"], batch["pixel_values"], 5)
    assert generate(*args, stop_ids=[-1]) == generate(*args, stop_ids=[-1], use_cache=False)
