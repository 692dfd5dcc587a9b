"""DeepEncoder (DeepSeek-OCR): official fixture, modes and placeholder counts, strict loading, stages."""

import functools
import io
import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.conftest import TINY_DATA, run_cli
from vlm.contracts import TiledViews, Tiling
from vlm.data.processing import Collator, ImageProcessor, SampleProcessor
from vlm.models import projectors
from vlm.models.encoders.deepencoder import COMPANIONS, DeepEncoder
from vlm.models.llms.gpt import build_gpt
from vlm.models.pretrained import CheckpointMismatchError
from vlm.models.resamplers import Identity, PixelShuffle
from vlm.models.vlm import VisionLanguageModel
from vlm.training.module import VLMModule

# made with the official code (its config.json says how); ../shared next to the repository
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "fixtures" / "deepencoder"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"fixture {FIXTURE} not on this machine")

# the fixture's sizes (config.json): SAM 96 wide, 2 blocks, block 1 global; CLIP 1024 wide, 2 layers
FIXTURE_SAM = {"embed_dim": 96, "depth": 2, "heads": 2, "global_attn_indexes": [1]}
FIXTURE_CLIP = {"layers": 2, "ffn_dim": 2048}
TINY_SAM = {
    "embed_dim": 32,
    "depth": 2,
    "heads": 2,
    "global_attn_indexes": [1],
    "neck_dim": 32,
    "compressor_dim": 32,
}
TINY_CLIP = {"width": 32, "layers": 1, "heads": 2, "ffn_dim": 64}
TINY_OVERRIDES = [f"encoder.sam.{k}={v}".replace(" ", "") for k, v in TINY_SAM.items()] + [
    f"encoder.clip.{k}={v}" for k, v in TINY_CLIP.items()
]
TINY_LLM = ["llm.n_embd=64", "llm.n_layer=2", "llm.n_head=2", "llm.n_kv_head=2"]


def tiny_encoder(mode: str = "tiny", window_only: bool = False, **kwargs) -> DeepEncoder:
    # window attention only keeps large modes cheap (a global block attends over all (S/16)² tokens)
    sam = {**TINY_SAM, "global_attn_indexes": []} if window_only else TINY_SAM
    return DeepEncoder(mode, sam=sam, clip=TINY_CLIP, **kwargs)


def vlm(encoder: DeepEncoder, width: int = 64, resampler=Identity) -> VisionLanguageModel:
    return VisionLanguageModel(
        encoder,
        resampler,
        projectors.linear,
        build_gpt(
            n_layer=1, n_head=2, n_embd=width, tokenizer="bytes", position_unit="token", spelled_head=False
        ),
    )


def fixture_encoder(**kwargs) -> DeepEncoder:
    return DeepEncoder("tiny", sam=FIXTURE_SAM, clip=FIXTURE_CLIP, pretrained=str(FIXTURE), **kwargs)


def image_bytes(width: int, height: int) -> bytes:
    noise = torch.rand(height, width, 3, generator=torch.Generator().manual_seed(width * height))
    pixels = (noise * 255).to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def raw_sample(key: str, width: int, height: int, answer: str = "some text") -> dict:
    record = {"prompt": "<image>\nRead the text.", "answers": [answer], "task": "ocr"}
    return {"__key__": key, "json": json.dumps(record).encode(), "png": image_bytes(width, height)}


# -- the official fixture ---------------------------------------------------------------------------


@needs_fixture
def test_fixture_reproduces_the_official_outputs():
    torch.manual_seed(0)
    model = vlm(fixture_encoder(), width=128)  # the fixture's LLM width: projector and layout load too
    expected = load_file(FIXTURE / "expected.safetensors")
    pixels = load_file(FIXTURE / "pixel_values.safetensors")["pixel_values"]
    processed = ImageProcessor(model.encoder.preprocessing)(Image.open(FIXTURE / "input.png"))
    assert torch.equal(processed, pixels[0])
    with torch.no_grad():
        sam = model.encoder.sam_model(pixels)
        outputs = {
            "sam_features": sam,
            "clip_features": model.encoder.vision_model(sam),
            "fused": model.encoder(pixels),
            "projected": model.projector(model.encoder(pixels)),
            "sequence": model.encode_images(pixels)[0],
        }
    for name, value in outputs.items():
        assert value.shape == expected[name].shape, name
        assert (value - expected[name]).abs().max() < 1e-4, name
    assert model.vision_tokens_per_image == 73


@needs_fixture
def test_bf16_stays_close_to_the_fp32_reference():
    encoder = fixture_encoder().to(torch.bfloat16)  # fp32 pixels are cast inside
    pixels = load_file(FIXTURE / "pixel_values.safetensors")["pixel_values"]
    with torch.no_grad():
        fused = encoder(pixels).float()
    diff = (fused - load_file(FIXTURE / "expected.safetensors")["fused"]).abs()
    # official bf16 vs fp32 on this fixture: max 0.082, mean 0.0037 (here: 0.051, 0.0031)
    assert diff.max() < 0.2 and diff.mean() < 0.008


@needs_fixture
def test_projector_and_layout_stay_fresh_when_the_llm_width_differs(caplog):
    with caplog.at_level(logging.INFO):
        model = vlm(fixture_encoder(), width=64)
    released = load_file(FIXTURE / "model.safetensors")
    assert "freshly initialised" in caplog.text
    for name in ("projector.layers.weight", "projector.image_newline", "projector.view_separator"):
        assert name in caplog.text
    assert not torch.equal(model.projector.image_newline, released["model.image_newline"][:64].float())
    assert "SAM and CLIP weights loaded" in caplog.text  # the encoder itself still loads


@needs_fixture
def test_full_size_names_and_shapes_equal_the_released_checkpoint():
    released = json.loads((FIXTURE / "full_size_keys.json").read_text())
    shapes = {t["name"]: tuple(t["shape"]) for t in released["tensors"]}
    with torch.device("meta"):
        model = VisionLanguageModel(
            DeepEncoder(),
            Identity,
            projectors.linear,
            build_gpt(n_layer=1, n_embd=1280, tokenizer="bytes", position_unit="token", spelled_head=False),
        )
    ours = {"model." + name: tuple(t.shape) for name, t in model.encoder.state_dict().items()}
    ours |= {name: tuple(model.get_parameter(own).shape) for name, own in COMPANIONS.items()}
    assert ours == shapes
    assert model.encoder.output_dim == 2048 and model.vision_tokens_per_image == 273


# -- modes and placeholder counts -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "size", "resize", "grid", "positions"),
    [
        ("tiny", 512, "resize", 8, 73),
        ("small", 640, "resize", 10, 111),
        ("base", 1024, "pad", 16, 273),
        ("large", 1280, "pad", 20, 421),
        ("gundam", 1024, "pad", 16, 273),  # an image too small to tile
    ],
)
def test_modes_give_the_official_sizes_and_token_counts(mode, size, resize, grid, positions):
    model = vlm(tiny_encoder(mode, window_only=True))
    prep = model.encoder.preprocessing
    assert (prep.size, prep.resize, prep.mean, prep.std) == ((size, size), resize, (0.5,) * 3, (0.5,) * 3)
    assert model.encoder.grid_size == (grid, grid) and model.vision_tokens_per_image == positions
    with torch.no_grad():
        out = model.encode_images(torch.randn(1, 3, size, size))
    assert out.shape == (1, positions, 64)
    newlines = out[0, grid : grid * (grid + 1) : grid + 1]  # the last position of every row
    assert torch.equal(newlines, model.projector.image_newline.expand(grid, 64))
    assert torch.equal(out[0, -1], model.projector.view_separator)


def test_wrong_view_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"mode=tiny expects 512x512 views, got \(640, 640\)"):
        tiny_encoder()(torch.randn(1, 3, 640, 640))


@pytest.mark.parametrize(
    ("width", "height", "tile_grid"),
    [
        (640, 640, (0, 0)),  # not larger than a tile: global view only
        (300, 600, (0, 0)),
        (1300, 700, (1, 2)),  # closest aspect 2:1; the 4x2 tie needs more pixels
        (700, 700, (2, 2)),
        (2000, 2000, (3, 3)),  # square tie broken towards more tiles for a large image
        (800, 1600, (2, 1)),
        (1500, 3000, (4, 2)),
    ],
)
def test_gundam_tile_grid_follows_the_aspect_ratio(width, height, tile_grid):
    assert Tiling().choose_grid(width, height) == tile_grid


def test_gundam_batches_images_with_different_placeholder_counts():
    model = vlm(tiny_encoder("gundam", window_only=True))
    tiling = model.encoder.preprocessing.tiling
    assert tiling.tokens_per_tile == (10, 10)
    tokenizer = model.tokenizer
    process = SampleProcessor(tokenizer, model.encoder.preprocessing, model.vision_tokens_per_image, 2048)
    wide, small = process(raw_sample("wide", 1300, 700)), process(raw_sample("small", 400, 300))
    # wide: 1x2 tiles -> (1*10) rows x (2*10 + 1 newline), then 16 x 17 global, then the separator
    assert wide["prompt_ids"].count(tokenizer.image_token_id) == 10 * 21 + 16 * 17 + 1
    assert small["prompt_ids"].count(tokenizer.image_token_id) == 16 * 17 + 1
    assert wide["pixel_values"].tiles.shape == (2, 3, 640, 640)
    assert small["pixel_values"].tiles.shape == (0, 3, 640, 640)

    batch = Collator(tokenizer.pad_id)([wide, small])
    assert batch["images_per_sample"].tolist() == [1, 1]
    pixels = move_data_to_device(batch, torch.device("meta"))["pixel_values"]  # Lightning moves it whole
    assert isinstance(pixels, TiledViews) and pixels.tiles.device.type == "meta"
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["pixel_values"]).logits  # counts are checked inside
        features = model.encoder(batch["pixel_values"])
        sequence = model.project(features)
    assert logits.shape[:2] == batch["input_ids"].shape
    assert sequence.shape == (10 * 21 + 16 * 17 + 1 + 16 * 17 + 1, 64)

    # the two tiles of `wide` side by side: row 0 holds tile 0's first token row, then tile 1's
    tiles = model.projector(features.tiles)  # (2, 100, 64)
    assert torch.equal(sequence[:10], tiles[0, :10]) and torch.equal(sequence[10:20], tiles[1, :10])
    assert torch.equal(sequence[20], model.projector.image_newline)
    assert torch.equal(sequence[21:31], tiles[0, 10:20])
    global_start = 10 * 21
    assert torch.equal(
        sequence[global_start : global_start + 16], model.projector(features.global_views[0, :16])
    )
    assert torch.equal(sequence[10 * 21 + 16 * 17], model.projector.view_separator)


def test_gundam_refuses_a_resampler_that_changes_the_tile_grid():
    with pytest.raises(ValueError, match=r"keeps a tile's \(10, 10\) token grid"):
        vlm(tiny_encoder("gundam", window_only=True), resampler=functools.partial(PixelShuffle, factor=2))


def test_layout_follows_the_resampled_grid():
    model = vlm(tiny_encoder(), resampler=functools.partial(PixelShuffle, factor=2))
    assert model.vision_grid == (4, 4) and model.vision_tokens_per_image == 4 * 5 + 1
    assert model.encode_images(torch.randn(2, 3, 512, 512)).shape == (2, 21, 64)


# -- pretrained loading ---------------------------------------------------------------------------


def released_layout(encoder: DeepEncoder) -> dict[str, torch.Tensor]:
    return {"model." + name: value.clone() for name, value in encoder.state_dict().items()}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("model.sam_model.neck.1.bias"), r"missing: model\.sam_model\.neck\.1\.bias"),
        (
            lambda t: t.update({"model.vision_model.post_layernorm.weight": torch.ones(32)}),
            r"unexpected: model\.vision_model\.post_layernorm\.weight",
        ),
        (
            lambda t: t.update({"model.sam_model.net_3.weight": torch.zeros(32, 32, 1, 1)}),
            r"mis-shaped: model\.sam_model\.net_3\.weight \(checkpoint \(32, 32, 1, 1\), model \(32, 32, 3, 3\)\)",
        ),
    ],
)
def test_strict_loading_names_the_offending_key(tmp_path, change, message):
    tensors = released_layout(tiny_encoder())
    change(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=message):
        tiny_encoder(pretrained=str(tmp_path))


def test_loads_sharded_checkpoints_and_ignores_the_llm(tmp_path):
    source = tiny_encoder()
    tensors = released_layout(source) | {
        "model.layers.0.mlp.weight": torch.ones(2),
        "lm_head.weight": torch.ones(2),
    }
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = tiny_encoder(pretrained=str(tmp_path))
    for name, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_a_hub_id_offline_and_uncached_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"deepseek-ai/DeepSeek-OCR.*not in the Hub cache"):
        tiny_encoder(pretrained="deepseek-ai/DeepSeek-OCR")


# -- training ---------------------------------------------------------------------------------------


def test_activation_checkpointing_gives_the_same_gradients(monkeypatch):
    import vlm.models.encoders.deepencoder as deepencoder

    calls = []
    monkeypatch.setattr(deepencoder, "checkpoint", lambda f, x, **kw: calls.append(f) or f(x))
    torch.manual_seed(0)
    plain = tiny_encoder()
    checkpointed = tiny_encoder(activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    pixels = torch.randn(1, 3, 512, 512)
    for encoder in (plain, checkpointed):
        encoder(pixels).square().mean().backward()
    assert len(calls) == len(plain.sam_model.blocks) + len(plain.vision_model.transformer.layers)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        if a.requires_grad:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), name


@pytest.mark.parametrize(("stage", "frozen"), [("1", ()), ("2", ("encoder.sam_model",))])
def test_stage_trains_the_encoder_or_freezes_sam_and_compressor(make_cfg, stage, frozen):
    cfg = make_cfg(
        "encoder=deepencoder",
        "encoder.mode=tiny",
        *TINY_OVERRIDES,
        *TINY_LLM,
        f"stage={stage}",
        "loss.context_dropout=0",
        "loss.ctc_weight=0",  # the next-token loss alone has to reach every trainable weight
        tiny=False,
    )
    module = VLMModule(cfg)
    assert module.frozen == list(frozen)
    model = module.model
    process = SampleProcessor(model.tokenizer, model.encoder.preprocessing, model.vision_tokens_per_image)
    batch = Collator(model.tokenizer.pad_id)([process(raw_sample(f"s{i}", 512, 64)) for i in range(2)])
    with torch.no_grad():  # nanochat zero-initialises its output projections, which would keep the
        for weight in model.llm.parameters():  # vision tokens from getting any gradient in step 1
            if not weight.any():
                weight.normal_(0.0, 0.02)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    bypassed = "encoder.vision_model.embeddings.patch_embedding.weight"  # CLIP's own, never used
    encoder_params = {name for name in before if name.startswith("encoder.") and name != bypassed}
    sam = {name for name in encoder_params if name.startswith("encoder.sam_model.")}
    assert {"encoder.sam_model.net_2.weight", "encoder.sam_model.net_3.weight"} <= sam  # the compressor
    assert changed & encoder_params == (encoder_params - sam if frozen else encoder_params)
    assert bypassed not in changed
    assert {"projector.image_newline", "projector.view_separator", "projector.layers.0.weight"} <= changed
    assert any(name.startswith("llm.") for name in changed)


def test_experiment_gives_the_official_composition(make_cfg):
    cfg = make_cfg("experiment=deepseek_ocr", "sizes=tiny", "llm=tiny", tiny=False)
    assert make_cfg("experiment=deepseek_ocr", tiny=False).llm.option == "llm=nanochat_d20"
    model = instantiate(cfg.model)
    assert isinstance(model.resampler, Identity) and isinstance(model.projector.layers, torch.nn.Linear)
    assert model.projector.layers.in_features == 64 and model.vision_tokens_per_image == 73
    assert cfg.loss.ctc_weight == 0 and cfg.loss.chunk_weight == 0 and cfg.optim.lr == 5e-5
    assert model.vision_position_stride == 1


def test_tiny_train_step_through_the_cli(tmp_path, data_dir):
    proc = run_cli(
        "train.py",
        "encoder=deepencoder",
        "encoder.mode=tiny",
        "stage=1",
        *TINY_OVERRIDES,
        *TINY_LLM,
        *TINY_DATA,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "generation.max_new_tokens=4",
        "test=false",
        "logger=csv",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert "model.encoder.sam_model.net_3.weight" in ckpt["state_dict"]
    assert "model.projector.image_newline" in ckpt["state_dict"]
    assert ckpt["hyper_parameters"]["cfg"]["encoder"]["mode"] == "tiny"
