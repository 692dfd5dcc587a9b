import functools

import pytest
import torch

from vlm.models import projectors
from vlm.models.encoders.tiny import TinyEncoder
from vlm.models.llms.gpt import build_gpt
from vlm.models.resamplers import AvgPool, Identity, Perceiver, PixelShuffle
from vlm.models.vlm import PlaceholderCountError, VisionLanguageModel


def tiny_vlm(resampler=None) -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel(
        TinyEncoder((32, 128), dim=32, depth=1, heads=2, stages=3),
        resampler or functools.partial(PixelShuffle, factor=4),
        functools.partial(projectors.mlp, layernorm=True),
        build_gpt(n_layer=2, n_head=2, n_embd=64),
    )


def test_placeholder_count_follows_from_the_parts():
    model = tiny_vlm()
    assert model.encoder.grid_size == (4, 16)
    assert model.vision_grid == (1, 4)  # pixel shuffle 4 folds 4x4 neighbourhoods
    assert model.vision_tokens_per_image == 4
    assert model.resampler.out_dim == 32 * 16


@pytest.mark.parametrize(
    ("resampler", "tokens", "width"),
    [
        (functools.partial(Identity), 64, 32),
        (functools.partial(PixelShuffle, factor=2), 16, 128),
        (functools.partial(AvgPool, grid=(1, 8)), 8, 32),
        (functools.partial(Perceiver, num_queries=5, depth=1, heads=2), 5, 32),
    ],
)
def test_resamplers_report_what_they_output(resampler, tokens, width):
    model = tiny_vlm(resampler)
    out = model.encode_images(torch.randn(3, 3, 32, 128))
    assert model.vision_tokens_per_image == tokens
    assert model.resampler.out_dim == width
    assert out.shape == (3, tokens, model.llm.hidden_size)


def test_pixel_shuffle_keeps_neighbourhoods_together():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 16, 2)  # 4x4 grid, 2 channels
    out = PixelShuffle(2, factor=2)(x, (4, 4))
    assert out.shape == (1, 4, 8)
    top_left = torch.stack([x[0, 0], x[0, 1], x[0, 4], x[0, 5]])  # tokens (0,0) (0,1) (1,0) (1,1)
    assert torch.equal(out[0, 0], top_left.flatten())


def test_impossible_combination_fails_at_construction_with_numbers():
    with pytest.raises(ValueError, match=r"factor 3 .* 4x16 grid"):
        tiny_vlm(functools.partial(PixelShuffle, factor=3))


def test_wrong_placeholder_count_names_both_counts():
    model = tiny_vlm()
    image_id = model.tokenizer.image_token_id
    ids = torch.tensor([[model.tokenizer.bos_id] + [image_id] * 3 + [65, 66]])
    with pytest.raises(PlaceholderCountError, match=r"3 <image> placeholders .* give 4 vision embeddings"):
        model(ids, torch.randn(1, 3, 32, 128))


def test_vision_embeddings_land_on_the_placeholders():
    model = tiny_vlm()
    image_id = model.tokenizer.image_token_id
    ids = torch.tensor(
        [[1, image_id, image_id, image_id, image_id, 2], [3, 4, image_id, image_id, image_id, image_id]]
    )
    pixels = torch.randn(2, 3, 32, 128)
    embeds = model.embed_inputs(ids, pixels)
    vision = model.encode_images(pixels)
    assert torch.allclose(embeds[0, 1:5], vision[0])
    assert torch.allclose(embeds[1, 2:6], vision[1])
    assert torch.allclose(embeds[0, 0], model.llm.embed(torch.tensor([1]))[0])


def test_gradients_reach_every_part():
    model = tiny_vlm()
    image_id = model.tokenizer.image_token_id
    ids = torch.tensor([[1] + [image_id] * 4 + [65, 66, 67]])
    model.llm.lm_head.weight.data.normal_()  # nanochat zero-inits the head
    model(ids, torch.randn(1, 3, 32, 128)).sum().backward()
    for part in ("encoder", "resampler", "projector", "llm"):
        grads = [p.grad for p in getattr(model, part).parameters()]
        if grads:
            assert all(g is not None for g in grads), part
