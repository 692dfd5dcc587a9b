import functools

import pytest
import torch

from vlm.data.processing import padded
from vlm.generation import GenerationConfig, ban_repeated_ngrams, generate
from vlm.models import projectors
from vlm.models.encoders.tiny import TinyEncoder
from vlm.models.llms.gpt import build_gpt, tokenizer_from_checkpoint
from vlm.models.llms.hf import build_hf_llm
from vlm.models.llms.tokenizer import train_bpe
from vlm.models.resamplers import PixelShuffle
from vlm.models.vlm import VisionLanguageModel


@functools.cache
def small_bpe():
    """A byte-level BPE of 300 ids (merges of 1-9 bytes), trained in milliseconds."""
    return train_bpe(
        ["the quick brown fox jumps over the lazy dog " * 4, "reading through vision tokens " * 4], 300
    )


def tiny_llm(backend: str):
    """Our nanochat-architecture GPT (`gpt_bpe`: with a BPE tokenizer, text positions counted in bytes and
    a spelled output head, as llm=tiny; `gpt_bpe_wpe`: and learned positions), or a transformers Llama
    behind `HFCausalLM`."""
    if backend == "gpt":
        return build_gpt(
            n_layer=2,
            n_head=4,
            n_kv_head=2,
            n_embd=64,
            tokenizer="bytes",
            position_unit="token",
            spelled_head=False,
        )
    if backend in ("gpt_bpe", "gpt_bpe_wpe"):
        with tokenizer_from_checkpoint(small_bpe()):
            return build_gpt(
                n_layer=2,
                n_head=4,
                n_kv_head=2,
                n_embd=64,
                position_unit="byte",
                spelled_head=True,
                learned_positions=512 if backend == "gpt_bpe_wpe" else 0,
            )
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    return build_hf_llm(
        config={**config, "num_attention_heads": 4, "num_key_value_heads": 2}, tokenizer="bytes"
    )


def random_vlm(vision_position_stride: int = 1, backend: str = "gpt") -> VisionLanguageModel:
    torch.manual_seed(0)
    model = VisionLanguageModel(
        TinyEncoder((32, 64), dim=32, depth=1, heads=2),
        functools.partial(PixelShuffle, factor=2),
        functools.partial(projectors.linear),
        tiny_llm(backend),
        vision_position_stride=vision_position_stride,
    )
    for p in model.parameters():  # nanochat zero-inits output projections: make the outputs vary
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def prompts(model, lengths):
    image_id = model.tokenizer.image_token_id
    seqs = [
        torch.tensor(
            [model.tokenizer.eos_id] + [image_id] * model.vision_tokens_per_image + list(range(40, 40 + n))
        )
        for n in lengths
    ]
    ids, mask = padded(seqs, model.tokenizer.pad_id, left=True)
    return seqs, ids, mask


STRIDES = pytest.mark.parametrize("stride", [1, 4])
BACKENDS = pytest.mark.parametrize("backend", ["gpt", "hf", "gpt_bpe", "gpt_bpe_wpe"])


@BACKENDS
@STRIDES
def test_cached_and_uncached_decoding_agree(stride, backend):
    model = random_vlm(stride, backend)
    _, ids, mask = prompts(model, [3, 7, 5])
    pixels = torch.randn(3, 3, 32, 64)
    cached = generate(model, ids, mask, pixels, max_new_tokens=24, stop_ids=[-1])
    uncached = generate(model, ids, mask, pixels, max_new_tokens=24, stop_ids=[-1], use_cache=False)
    assert cached == uncached
    assert all(len(row) == 24 for row in cached)
    assert len({tuple(r) for r in cached}) > 1  # the prompts differ, so should the outputs


def test_byte_positions_advance_by_each_tokens_bytes():
    """text_position_unit=byte (llm=tiny's): a text token moves the position on by its UTF-8 length, a
    vision token by the stride; generation then agrees with training (the tests around this one)."""
    model = random_vlm(4, "gpt_bpe")
    tok, image = model.tokenizer, model.tokenizer.image_token_id
    text = tok.encode("the quick brown fox")
    lengths = [len(tok.decode([i]).encode()) for i in text]
    assert max(lengths) > 1 and model.text_position_unit == "byte"
    ids = torch.tensor([[tok.bos_id, image, image, *text]])
    steps = [1, 4, 4, *lengths]  # each token sits where its own bytes end
    assert model.position_ids(ids)[0].tolist() == [sum(steps[: i + 1]) for i in range(len(steps))]
    assert random_vlm(4, "gpt").text_position_unit == "token"  # the byte tokenizer: the same positions
    with pytest.raises(ValueError, match=r"model.text_position_unit='chars': expected one of token, byte"):
        VisionLanguageModel(
            TinyEncoder((32, 64), dim=32, depth=1, heads=2),
            functools.partial(PixelShuffle, factor=2),
            functools.partial(projectors.linear),
            tiny_llm("gpt"),
            text_position_unit="chars",
        )


def test_learned_positions_tell_a_token_where_it_stands():
    """Rotary alone scores relative distances, so shifting every position id changes the logits only by
    its tables' bf16 rounding; with llm.learned_positions the shift changes them, cached decoding still
    equals the full forward, and a position past the table is an error naming the option."""
    rotary, learned = random_vlm(4, "gpt_bpe").llm, random_vlm(4, "gpt_bpe_wpe").llm
    embeds = torch.randn(2, 10, 64)
    positions = torch.arange(10).expand(2, 10)

    def shift_effect(llm) -> float:
        base, shifted = llm(embeds, position_ids=positions), llm(embeds, position_ids=positions + 7)
        return float((base - shifted).abs().max())

    assert shift_effect(rotary) < 0.1 < 10 * shift_effect(rotary) < shift_effect(learned)
    cache = learned.new_kv_cache(2, 10)
    steps = [learned(embeds[:, :6], kv_cache=cache)] + [
        learned(embeds[:, i : i + 1], kv_cache=cache) for i in range(6, 10)
    ]
    assert torch.allclose(torch.cat(steps, dim=1), learned(embeds), atol=1e-5)
    with pytest.raises(ValueError, match=r"position 512 is beyond the 512 learned positions \(llm.learned"):
        learned(embeds, position_ids=positions + 503)


def test_cached_logits_equal_full_forward():
    model = random_vlm()
    embeds = torch.randn(2, 10, 64)
    full = model.llm(embeds)
    cache = model.llm.new_kv_cache(2, 10)
    steps = [model.llm(embeds[:, :6], kv_cache=cache)] + [
        model.llm(embeds[:, i : i + 1], kv_cache=cache) for i in range(6, 10)
    ]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@BACKENDS
@STRIDES
def test_left_padded_batch_decodes_like_each_prompt_alone_and_like_training(stride, backend):
    """Generation (left padding, cache) gives each prompt's own tokens, at the positions that
    training's forward pass (no mask, no cache) gives them."""
    model = random_vlm(stride, backend)
    seqs, ids, mask = prompts(model, [2, 9])
    pixels = torch.randn(2, 3, 32, 64)
    batched = generate(model, ids, mask, pixels, max_new_tokens=12, stop_ids=[-1])
    for i, seq in enumerate(seqs):
        alone = generate(
            model,
            seq[None],
            torch.ones(1, len(seq), dtype=torch.long),
            pixels[i : i + 1],
            max_new_tokens=12,
            stop_ids=[-1],
        )
        assert alone[0] == batched[i]
        full = torch.cat([seq, torch.tensor(batched[i])])[None]
        logits = model(full, pixels[i : i + 1]).logits
        assert logits[0, len(seq) - 1 : -1].argmax(-1).tolist() == batched[i]


def test_stop_token_ends_each_sequence():
    model = random_vlm()
    _, ids, mask = prompts(model, [4, 4])
    pixels = torch.randn(2, 3, 32, 64)
    free = generate(model, ids, mask, pixels, max_new_tokens=10, stop_ids=[-1])
    stop = free[0][3]
    stopped = generate(model, ids, mask, pixels, max_new_tokens=10, stop_ids=[stop])
    assert stopped[0] == free[0][: free[0].index(stop)]
    assert stop not in stopped[1]


def test_sampling_is_reproducible_with_a_generator():
    model = random_vlm()
    _, ids, mask = prompts(model, [4])
    pixels = torch.randn(1, 3, 32, 64)
    runs = [
        generate(
            model,
            ids,
            mask,
            pixels,
            max_new_tokens=16,
            temperature=1.0,
            top_p=0.9,
            stop_ids=[-1],
            generator=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_vision_tokens_advance_positions_by_the_stride():
    model = random_vlm(4)
    image = model.tokenizer.image_token_id
    ids = torch.tensor([[0, 0, 7, image, image, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    assert model.position_ids(ids, mask).tolist() == [[0, 0, 0, 1, 5, 9, 10]]
    assert random_vlm(1).position_ids(ids, mask) is None  # the LLM counts positions itself


def looping_vlm() -> VisionLanguageModel:
    """A model that, greedy, repeats itself: the head favours copying the previous input token."""
    model = random_vlm()
    with torch.no_grad():
        model.llm.transformer.wte.weight.normal_(std=1.0)
        for block in model.llm.transformer.h:  # blocks off: the logits read the current token alone
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        vocab = model.llm.lm_head.weight.shape[0]
        cycle = {40 + i: 40 + (i + 1) % 3 for i in range(3)}  # 40 -> 41 -> 42 -> 40 -> ...
        head = torch.zeros(vocab, vocab)
        for token, nxt in cycle.items():
            head[nxt, token] = 10.0
        for token in range(vocab):
            if token not in cycle:
                head[40 + token % 3, token] = 10.0
            head[(token * 7 + 1) % 256, token] = 5.0  # a runner-up for every token
        # logits = head @ onehot(current token): lm_head(rms_norm(wte[token])) via a pseudo-inverse
        embed = torch.nn.functional.rms_norm(model.llm.transformer.wte.weight, (64,))
        model.llm.lm_head.weight.copy_(head @ torch.linalg.pinv(embed).T)
    return model


def test_no_repeat_ngram_guard_breaks_a_loop():
    model = looping_vlm()
    _, ids, mask = prompts(model, [3])
    pixels = torch.randn(1, 3, 32, 64)
    free = generate(model, ids, mask, pixels, max_new_tokens=30, stop_ids=[-1])
    n = 4
    grams = [tuple(free[0][i : i + n]) for i in range(len(free[0]) - n + 1)]
    assert len(set(grams)) < len(grams)  # without the guard it loops 40, 41, 42, ...
    config = GenerationConfig(max_new_tokens=30, stop_ids=[-1], no_repeat_ngram_size=n)
    guarded = generate(model, ids, mask, pixels, config=config)[0]
    grams = [tuple(guarded[i : i + n]) for i in range(len(guarded) - n + 1)]
    assert len(guarded) == 30 and len(set(grams)) == len(grams)  # no 4-gram twice


def test_ngram_guard_window_and_exempt_tokens():
    logits = torch.zeros(1, 10)
    outputs = torch.tensor([[1, 2, 3, 4, 5, 1, 2]])  # prefix (1, 2) was followed by 3
    no_exempt = torch.tensor([], dtype=torch.long)
    banned = ban_repeated_ngrams(logits, outputs, 3, None, no_exempt)
    assert banned[0, 3] == float("-inf") and torch.isfinite(banned[0, torch.arange(10) != 3]).all()
    # a window of the last 5 tokens no longer holds (1, 2, 3)
    assert torch.isfinite(ban_repeated_ngrams(logits, outputs, 3, 5, no_exempt)).all()
    # an exempt token may repeat
    assert torch.isfinite(ban_repeated_ngrams(logits, outputs, 3, None, torch.tensor([3]))).all()
    # per row: the other row's history bans nothing here
    two = ban_repeated_ngrams(
        torch.zeros(2, 10), torch.tensor([[1, 2, 3, 1, 2], [5, 6, 7, 8, 9]]), 3, None, no_exempt
    )
    assert two[0, 3] == float("-inf") and torch.isfinite(two[1]).all()


def test_chunk_after_cache_without_mask_is_causal():
    """A multi-token chunk fed after a filled cache with no attention mask attends causally: position i
    of the chunk sees the cache and the chunk up to i, so a prompt in chunks gives the full forward's
    logits (an all-True mask let each token see the later ones of its chunk)."""
    llm = random_vlm().llm
    embeds = torch.randn(2, 10, 64)
    full = llm(embeds)
    for cut in (1, 4, 7):
        cache = llm.new_kv_cache(2, 10)
        chunks = [llm(embeds[:, :cut], kv_cache=cache), llm(embeds[:, cut:], kv_cache=cache)]
        assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)
    cache = llm.new_kv_cache(2, 10)
    chunks = [llm(embeds[:, a:b], kv_cache=cache) for a, b in ((0, 3), (3, 6), (6, 10))]
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)
