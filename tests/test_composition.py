"""Every encoder x resampler x projector option composes from the config groups (at test sizes) and
trains a step; the combinations that cannot work fail at construction, naming options and numbers."""

from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException

from tests.steps import make_batch, train_step
from tests.test_config import options
from vlm.models.vlm import CompositionError
from vlm.training.module import VLMModule

ENCODERS, RESAMPLERS, PROJECTORS = options("encoder"), options("resampler"), options("projector")
# BLIP-2's 32 queries are a set, not a grid: nothing to fold or pool spatially
IMPOSSIBLE = {("blip2", "pixel_shuffle"), ("blip2", "avgpool")}


def test_every_option_is_covered():
    assert set(ENCODERS) == {"tiny", "siglip", "blip2", "deepencoder"}
    assert set(RESAMPLERS) == {"identity", "pixel_shuffle", "perceiver", "avgpool"}
    assert set(PROJECTORS) == {"linear", "mlp"}


@pytest.mark.parametrize("projector", PROJECTORS)
@pytest.mark.parametrize("resampler", RESAMPLERS)
@pytest.mark.parametrize("encoder", ENCODERS)
def test_combination_trains_one_step(make_cfg, encoder, resampler, projector):
    cfg = make_cfg(f"encoder={encoder}", f"resampler={resampler}", f"projector={projector}")
    if (encoder, resampler) in IMPOSSIBLE:
        with pytest.raises(InstantiationException) as error:
            VLMModule(cfg)
        assert isinstance(error.value.__cause__, CompositionError)
        assert f"encoder={encoder}" in str(error.value) and f"resampler={resampler}" in str(error.value)
        assert "32 tokens (no spatial grid)" in str(error.value)
        return

    torch.manual_seed(0)
    module = VLMModule(cfg)
    model = module.model
    batch = make_batch(model, ["text 0", "text 1"])

    # the placeholders the data writes are exactly the vision tokens the parts make
    vision = model.encode_images(batch["pixel_values"])
    placeholders = (batch["input_ids"] == model.tokenizer.image_token_id).sum(-1)
    assert vision.shape == (2, model.vision_tokens_per_image, model.llm.hidden_size)
    assert placeholders.tolist() == [model.vision_tokens_per_image] * 2
    changed = train_step(module, batch)
    assert any(name.startswith("projector.") for name in changed)  # always trained, and it moved
    if encoder == "blip2":  # frozen by default, as vision-encoded-nanochat keeps it
        assert "encoder" in module.frozen
        assert not any(p.requires_grad for p in model.encoder.parameters())


# -- the public projects' recipes ------------------------------------------------------------------
# experiment -> (encoder, resampler, projector, llm option, vision tokens per image at official sizes)
RECIPES = {
    "vision_encoded_nanochat": ("Blip2Encoder", "Identity", "Linear", "llm=nanochat_d32", 32),
    "nanovlm": ("SigLIPEncoder", "PixelShuffle", "Linear", "llm=smollm2_135m", 64),
    "ghostvis": ("SigLIPEncoder", "Perceiver", "Sequential", "llm=qwen2_5_0_5b", 64),
    "deepseek_ocr": ("DeepEncoder", "Identity", "WithLayout", "llm=nanochat_d20", 273),
}


def test_every_experiment_is_a_known_recipe():
    assert set(options("experiment")) == {
        *RECIPES,
        "ocr_tiny",
        "longdoc_cpu",
        "longdoc_gpu",
        "longdoc_bpe_cpu",
        "longdoc_bpe_gpu",
    }  # longdoc: test_longdoc; longdoc_bpe: test_longdoc_arms


@pytest.mark.parametrize("experiment", RECIPES)
def test_recipe_at_official_sizes_gives_its_token_count(make_cfg, experiment):
    encoder, resampler, projector, llm, tokens = RECIPES[experiment]
    cfg = make_cfg(f"experiment={experiment}", "llm=tiny", "encoder.pretrained=null", tiny=False)
    assert make_cfg(f"experiment={experiment}", tiny=False).llm.option == llm  # lands with issue #5
    with torch.device("meta"):  # official sizes, no memory
        model = VLMModule(cfg).model
    assert type(model.encoder).__name__ == encoder and type(model.resampler).__name__ == resampler
    assert type(model.projector).__name__ == projector
    assert model.vision_tokens_per_image == tokens


@pytest.mark.parametrize("experiment", RECIPES)
def test_recipe_trains_a_step_at_test_sizes(make_cfg, experiment):
    module = VLMModule(make_cfg(f"experiment={experiment}", "llm=tiny"))
    model = module.model
    batch = make_batch(model, ["words", "words"])
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    if experiment == "vision_encoded_nanochat":  # projector-only training
        assert trainable == {"model.projector.weight", "model.projector.bias"}
    loss, _ = module.loss(batch)
    loss.backward()
    assert all(p.grad is not None for name, p in module.named_parameters() if name in trainable)


def test_the_manuals_token_table_is_what_the_models_compute():
    from vlm.app.catalog import token_table

    usage = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    table = token_table()
    assert table in usage, f"docs/usage.md is out of date; paste `python -m vlm.app.catalog`:\n{table}"
