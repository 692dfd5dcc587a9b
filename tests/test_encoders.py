"""SigLIP (timm) and BLIP-2 (transformers): checkpoints saved by those libraries load through our
configs strictly and give the libraries' own features."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from vlm.models.encoders.blip2 import Blip2Encoder
from vlm.models.encoders.siglip import SigLIPEncoder
from vlm.models.pretrained import CheckpointMismatchError

SIGLIP = "vit_base_patch16_siglip_224"
TINY_SIGLIP = {"embed_dim": 32, "depth": 3, "num_heads": 2, "img_size": 64}


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A tiny SigLIP saved by timm in its Hub layout (config.json + model.safetensors)."""
    torch.manual_seed(0)
    model = timm.create_model(SIGLIP, pretrained=False, **TINY_SIGLIP).eval()
    directory = tmp_path_factory.mktemp("siglip")
    timm.models.save_for_hf(model, directory, safe_serialization=True)
    return directory, model


def siglip(pretrained, **kwargs) -> SigLIPEncoder:
    return SigLIPEncoder(SIGLIP, pretrained=str(pretrained), model_kwargs=TINY_SIGLIP, **kwargs).eval()


def test_siglip_from_a_timm_directory_gives_timms_patch_tokens(siglip_dir):
    directory, reference = siglip_dir
    assert (directory / "model.safetensors").is_file()
    encoder = siglip(directory)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = encoder(pixels), reference.forward_features(pixels)
    assert encoder.grid_size == (4, 4) and encoder.output_dim == 32
    assert ours.shape == (2, 16, 32)
    assert torch.equal(ours, theirs)
    assert encoder.trunk.attn_pool is None  # no pooling head
    assert encoder.preprocessing.size == (64, 64) and encoder.preprocessing.mean == (0.5, 0.5, 0.5)


def test_siglip_penultimate_features_skip_the_last_block_and_norm(siglip_dir):
    directory, reference = siglip_dir
    encoder = siglip(directory, feature_layer=-2)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = encoder(pixels)
        (theirs,) = reference.forward_intermediates(
            pixels, indices=[1], output_fmt="NLC", intermediates_only=True
        )
    assert len(encoder.trunk.blocks) == 2  # block 3 is dropped, not run
    assert torch.equal(ours, theirs)


def test_siglip_open_clip_layout_and_a_new_resolution(tmp_path, siglip_dir):
    """open_clip keeps the timm trunk under `visual.trunk.` next to its text tower (the layout of
    timm's `webli` files); another image size resamples the learned positions."""
    _, reference = siglip_dir
    state = {f"visual.trunk.{name}": value for name, value in reference.state_dict().items()}
    state["text.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "open_clip_model.safetensors")
    with torch.no_grad():
        same = siglip(tmp_path)(torch.ones(1, 3, 64, 64))
        assert torch.equal(same, reference.forward_features(torch.ones(1, 3, 64, 64)))
        wide = siglip(tmp_path / "open_clip_model.safetensors", image_size=[32, 128])
        assert wide.grid_size == (2, 8) and wide(torch.randn(1, 3, 32, 128)).shape == (1, 16, 32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda state: state.pop("blocks.1.mlp.fc1.weight"), r"missing: blocks\.1\.mlp\.fc1\.weight"),
        (lambda state: state.update(extra=torch.zeros(1)), r"unexpected: extra"),
        (
            lambda state: state.update({"norm.weight": torch.zeros(7)}),
            r"mis-shaped: norm\.weight \(checkpoint \(7,\), model \(32,\)\)",
        ),
    ],
)
def test_siglip_strict_loading_names_the_key(tmp_path, siglip_dir, change, message):
    state = load_file(siglip_dir[0] / "model.safetensors")
    change(state)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=message):
        siglip(tmp_path)


def test_siglip_unknown_tag_and_uncached_tag_are_clear_errors():
    with pytest.raises(FileNotFoundError, match=r"no tag 'nope' .*its tags: .*webli"):
        siglip("nope")
    with pytest.raises(FileNotFoundError, match=r"timm/vit_base_patch16_siglip_224\.webli.*HF_HUB_OFFLINE"):
        siglip("webli")  # offline in tests, and not in the Hub cache


# -- BLIP-2 ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    """A tiny Blip2ForConditionalGeneration (OPT text side) saved by transformers' save_pretrained;
    the Q-Former at BLIP-2's official width and query count."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    config = Blip2Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        qformer_config={
            "hidden_size": 768,
            "num_hidden_layers": 2,
            "num_attention_heads": 12,
            "intermediate_size": 256,
        },
        text_config=OPTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=64,
            vocab_size=64,
            word_embed_proj_dim=32,
        ).to_dict(),
        num_query_tokens=32,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("blip2")
    Blip2ForConditionalGeneration(config).save_pretrained(directory)
    processor = {
        "image_mean": [0.1, 0.2, 0.3],
        "image_std": [0.4, 0.5, 0.6],
        "size": {"height": 32, "width": 32},
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    return directory


def test_blip2_from_save_pretrained_equals_transformers_qformer_features(blip2_dir):
    from transformers import Blip2Model

    encoder = Blip2Encoder(pretrained=str(blip2_dir)).eval()
    reference = Blip2Model.from_pretrained(blip2_dir).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = encoder(pixels), reference.get_qformer_features(pixels)
    assert ours.shape == (2, 32, 768)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert encoder.grid_size == (1, 32) and not encoder.spatial and not encoder.trainable
    assert encoder.preprocessing.size == (32, 32) and encoder.preprocessing.std == (0.4, 0.5, 0.6)


def test_blip2_strict_loading_names_the_key(tmp_path, blip2_dir):
    state = load_file(blip2_dir / "model.safetensors")
    del state["qformer.layernorm.weight"]
    state["query_tokens_extra"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((blip2_dir / "config.json").read_text())
    with pytest.raises(
        CheckpointMismatchError, match=r"missing: qformer\.layernorm\.weight; unexpected: query_tokens_extra"
    ):
        Blip2Encoder(pretrained=str(tmp_path))


def test_blip2_sizes_come_from_the_checkpoint_not_the_config(blip2_dir):
    with pytest.raises(ValueError, match=r"sizes come from its config\.json"):
        Blip2Encoder(pretrained=str(blip2_dir), qformer_config={"hidden_size": 64})


def test_blip2_hub_id_offline_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match=r"Salesforce/blip2-opt-2\.7b.*not in the Hub cache"):
        Blip2Encoder(pretrained="Salesforce/blip2-opt-2.7b")
