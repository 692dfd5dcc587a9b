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


@pytest.mark.parametrize(("group", "overlays"), [("encoder", "encoder_sizes"), ("llm", "llm_sizes")])
def test_every_option_has_an_overlay_per_size(group, overlays):
    sizes = options("sizes")
    assert sizes == ["official", "tiny"]
    have = set(options(overlays))
    missing = [f"{overlays}/{o}_{s}" for o in options(group) for s in sizes if f"{o}_{s}" not in have]
    assert not missing
    assert len(have) == len(options(group)) * len(sizes)  # and no overlay without its option


def test_an_option_without_its_size_overlay_stops_composition_naming_it(tmp_path):
    import shutil

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    conf = tmp_path / "conf"
    shutil.copytree(CONFIG_DIR, conf)
    shutil.copy(conf / "encoder" / "tiny.yaml", conf / "encoder" / "mine.yaml")
    shutil.copy(conf / "encoder_sizes" / "tiny_official.yaml", conf / "encoder_sizes" / "mine_official.yaml")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        assert compose("train", ["encoder=mine"]).encoder.depth == 3  # official: the option as it is
        with pytest.raises(MissingConfigException, match="encoder_sizes/mine_tiny"):
            compose("train", ["encoder=mine", "sizes=tiny"])
    GlobalHydra.instance().clear()
