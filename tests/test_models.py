import functools

import pytest
import torch

from vlm.models import projectors
from vlm.models.encoders.tiny import TinyEncoder
from vlm.models.llms.gpt import build_gpt
from vlm.models.resamplers import AvgPool, Identity, Perceiver, PixelShuffle
from vlm.models.vlm import CompositionError, PlaceholderCountError, VisionLanguageModel


def tiny_vlm(resampler=None) -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel(
        TinyEncoder((32, 128), dim=32, depth=1, heads=2, stages=3),
        resampler or functools.partial(PixelShuffle, factor=4),
        functools.partial(projectors.mlp, layernorm=True),
        build_gpt(
            n_layer=2, n_head=2, n_embd=64, tokenizer="bytes", position_unit="token", spelled_head=False
        ),
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
        (functools.partial(AvgPool, tokens=None, grid=(1, 8)), 8, 32),
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


def test_rectangular_pixel_shuffle_folds_a_strip_into_quarters():
    """factor [2, 8] on a one-line strip's 2x32 grid: 4 tokens, token j = columns 8j..8j+7 of both rows."""
    x = torch.arange(2 * 32 * 3, dtype=torch.float32).view(1, 64, 3)  # 2x32 grid, 3 channels
    shuffle = PixelShuffle(3, factor=[2, 8])
    assert shuffle.output_grid((2, 32)) == (1, 4) and shuffle.out_dim == 3 * 16
    out = shuffle(x, (2, 32))
    assert out.shape == (1, 4, 48)
    second = torch.stack([x[0, row * 32 + col] for row in range(2) for col in range(8, 16)])
    assert torch.equal(out[0, 1], second.flatten())
    with pytest.raises(
        ValueError, match=r"factor 2x6 .* 2x32 grid \(rows among 1, 2, cols among 1, 2, 4, 8, 16, 32\)"
    ):
        PixelShuffle(3, factor=[2, 6]).output_grid((2, 32))


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
    model(ids, torch.randn(1, 3, 32, 128)).logits.sum().backward()
    for part in ("encoder", "resampler", "projector", "llm"):
        grads = [p.grad for p in getattr(model, part).parameters()]
        if grads:
            assert all(g is not None for g in grads), part


@pytest.mark.parametrize(
    ("grid", "tokens", "out"),
    [((32, 32), 16, (4, 4)), ((2, 32), 16, (1, 16)), ((16, 16), 64, (8, 8)), ((1, 32), 8, (1, 8))],
)
def test_avgpool_to_a_token_count_keeps_the_aspect_ratio(grid, tokens, out):
    pool = AvgPool(8, tokens=tokens)
    assert pool.output_grid(grid) == out
    x = torch.randn(2, grid[0] * grid[1], 8)
    assert pool(x, grid).shape == (2, tokens, 8)


def test_avgpool_averages_neighbourhoods():
    x = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid, one channel
    out = AvgPool(1, tokens=None, grid=(2, 2))(x, (4, 4))
    assert out.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # mean of (0,1,4,5), (2,3,6,7), ...


def test_avgpool_that_cannot_fit_names_the_numbers():
    with pytest.raises(ValueError, match=r"cannot pool a 2x2 grid \(4 tokens\) to 3 tokens"):
        AvgPool(8, tokens=3).output_grid((2, 2))
    with pytest.raises(ValueError, match="exactly one of `tokens` or `grid`"):
        AvgPool(8, tokens=4, grid=(2, 2))


def test_pixel_shuffle_error_suggests_the_factors_that_divide():
    with pytest.raises(
        ValueError, match=r"factor 4 .* 6x12 grid \(choose resampler.factor among 1, 2, 3, 6\)"
    ):
        PixelShuffle(8, factor=4).output_grid((6, 12))


def test_perceiver_shapes_depth_and_dependence_on_the_input():
    torch.manual_seed(0)
    perceiver = Perceiver(32, num_queries=7, depth=3, heads=4)
    assert len(perceiver.blocks) == 3 and perceiver.output_grid((5, 9)) == (1, 7)
    x = torch.randn(2, 45, 32)
    out = perceiver(x, (5, 9))
    assert out.shape == (2, 7, 32)
    assert not torch.allclose(out[0], out[1])  # the queries read the tokens
    assert perceiver(torch.randn(2, 11, 32), (1, 11)).shape == (2, 7, 32)  # any number of input tokens


def test_perceiver_heads_must_divide_the_width():
    with pytest.raises(
        ValueError, match=r"heads=5 .* width is 32 \(choose resampler.heads among 1, 2, 4, 8, 16, 32\)"
    ):
        Perceiver(32, heads=5)


def test_composition_error_names_the_encoder_and_its_grid(make_cfg):
    """Composed by Hydra, the parts go by the options chosen (`model.options`); built in Python, by class."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    with pytest.raises(
        CompositionError,
        match=r"encoder=TinyEncoder \(32x128 image -> 4x16 grid of width 32\) .* resampler=PixelShuffle with factor 3",
    ):
        tiny_vlm(functools.partial(PixelShuffle, factor=3))
    cfg = make_cfg("resampler=pixel_shuffle", "resampler.factor=3")
    with pytest.raises(
        InstantiationException, match=r"encoder=tiny \(.*\) .* resampler=pixel_shuffle with factor 3"
    ):
        instantiate(cfg.model)
