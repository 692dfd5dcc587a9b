import pytest
from hydra.utils import instantiate

from vlm.config import CONFIG_DIR, quote_integer_options

GROUPS = [
    "encoder",
    "resampler",
    "projector",
    "llm",
    "data",
    "stage",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "benchmark",
    "experiment",
    "debug",
    "hydra",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_design_group_exists_with_options():
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no options"
    for name in ["tiny", "deepencoder", "siglip", "blip2"]:
        assert name in options("encoder")
    for name in ["identity", "pixel_shuffle", "perceiver", "avgpool"]:
        assert name in options("resampler")
    for name in ["tiny", "nanochat_d20", "nanochat_d32", "smollm2_135m", "qwen2_5_0_5b"]:
        assert name in options("llm")
    assert {"1", "2", "align", "sft"} <= set(options("stage"))


@pytest.mark.parametrize("group", [g for g in GROUPS if g != "hydra"])
def test_every_option_composes(group, make_cfg):
    for option in options(group):
        cfg = make_cfg(f"{group}={option}", tiny=False)
        assert cfg is not None, f"{group}={option}"


def test_integer_stage_names_work_as_typed(make_cfg):
    assert quote_integer_options(["stage=1", "stage=1,2", "trainer.devices=8", "x=stage=1"]) == [
        "stage='1'",
        "stage='1','2'",
        "trainer.devices=8",
        "x=stage=1",
    ]
    assert make_cfg("stage=2").stage.name == "2"
    assert make_cfg("stage=1").stage.train.encoder is True


def test_precision_follows_the_machine(make_cfg):
    cfg = make_cfg("trainer=cpu")
    assert cfg.trainer.precision == "32-true"


def test_default_model_builds_and_resampler_options_compose(make_cfg):
    for resampler in options("resampler"):
        model = instantiate(make_cfg(f"resampler={resampler}").model)
        assert model.vision_tokens_per_image > 0


def test_every_benchmark_option_instantiates(make_cfg):
    for name in options("benchmark"):
        benchmark = instantiate(make_cfg(f"benchmark={name}", config="eval").benchmark)
        assert benchmark.name == name and benchmark.batch_size > 0
