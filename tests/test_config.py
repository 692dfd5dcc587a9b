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


# Targets that several options share, each option with its own values (a model's sizes and weights, a
# source's shards and batch sizes): no one Python default can equal them all, so they are not compared.
SHARED_TARGETS = {
    "vlm.data.datamodule.ShardDataModule",  # data=coco|docvqa|mix|olmocr|synthetic|text
    "vlm.models.llms.hf.build_hf_llm",  # llm=qwen2_5_0_5b|qwen2_5_1_5b|smollm2_135m|smollm2_360m
    "vlm.models.llms.nanochat.build_nanochat",  # llm=nanochat_d20|nanochat_d32
}


def _plain(value):
    """Containers as plain dicts and lists (a YAML list and a Python tuple default are the same value)."""
    from collections.abc import Mapping

    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _has_interpolation(value) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, dict):
        return any(_has_interpolation(v) for v in value.values())
    return isinstance(value, list) and any(_has_interpolation(v) for v in value)


def _python_defaults(target) -> dict:
    """The keyword defaults of a function or class (a dataclass field's default_factory called)."""
    import dataclasses
    import inspect

    factories = {}
    if dataclasses.is_dataclass(target):
        factories = {
            f.name: f.default_factory
            for f in dataclasses.fields(target)
            if f.default_factory is not dataclasses.MISSING
        }
    defaults = {}
    for name, parameter in inspect.signature(target).parameters.items():
        if name in factories:
            defaults[name] = factories[name]()
        elif parameter.default is not inspect.Parameter.empty:
            defaults[name] = parameter.default
    return defaults


def _vlm_targets(node, where: str):
    """(path, node) of every node below `node` whose `_target_` is in the vlm package."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig):
        own = "_target_" in node and not OmegaConf.is_interpolation(node, "_target_")
        if own and str(node._target_).startswith("vlm."):
            yield where, node
        children = [(key, f"{where}.{key}") for key in node]
    elif isinstance(node, ListConfig):
        children = [(i, f"{where}[{i}]") for i in range(len(node))]
    else:
        return
    for key, path in children:
        if not OmegaConf.is_interpolation(node, key):
            yield from _vlm_targets(node[key], path)


def test_python_defaults_equal_the_yaml_defaults(make_cfg):
    """A class or function built from one option has that option's values as its own defaults, so that
    `TinyEncoder()` is `encoder=tiny`. Each option is composed (its defaults list included, at the official
    sizes), nothing is instantiated; `${...}` values are left out."""
    from hydra.utils import get_method
    from omegaconf import OmegaConf

    uses: dict[str, list[tuple[str, object]]] = {}
    for group in sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir()):
        for option in options(group):
            if "_target_: vlm." not in (CONFIG_DIR / group / f"{option}.yaml").read_text():
                continue
            node = make_cfg(f"{group}={option}", tiny=False)[group]
            for where, target_node in _vlm_targets(node, f"{group}={option}"):
                uses.setdefault(target_node._target_, []).append((where, target_node))

    assert {target for target, used in uses.items() if len(used) > 1} == SHARED_TARGETS
    assert {"vlm.models.encoders.tiny.TinyEncoder", "vlm.models.resamplers.Perceiver"} <= set(uses)
    differ, compared = [], 0
    for target, used in sorted(uses.items()):
        if target in SHARED_TARGETS:
            continue
        (where, node), python = used[0], _python_defaults(get_method(target))
        for key in node:
            if key not in python or OmegaConf.is_interpolation(node, key):
                continue
            value = node[key]
            yaml_value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            if _has_interpolation(yaml_value):
                continue
            compared += 1
            if _plain(yaml_value) != _plain(python[key]):
                differ.append(f"{where}: {target} {key}: YAML {yaml_value!r}, Python {python[key]!r}")
    assert not differ, "\n".join(differ)
    assert compared > 50


def test_stages_have_names_and_their_numbers_still_work(make_cfg):
    """stage=pretrain|finetune are DeepSeek-OCR's stage=1|2, one definition each; the numbers compose as
    before (stage.name is the option as typed, "1"/"2" as in earlier runs and checkpoints)."""
    from omegaconf import OmegaConf

    assert {"pretrain", "finetune", "1", "2"} <= set(options("stage"))
    for number, name in [("1", "pretrain"), ("2", "finetune")]:
        named = OmegaConf.to_container(make_cfg(f"stage={name}").stage)
        numbered = OmegaConf.to_container(make_cfg(*quote_integer_options([f"stage={number}"])).stage)
        assert named["name"] == name and numbered["name"] == number
        assert {**named, "name": number} == numbered
        assert set(OmegaConf.load(CONFIG_DIR / "stage" / f"{number}.yaml")) == {"defaults", "name"}  # no copy
    finetune = make_cfg("stage=finetune").stage
    assert finetune.freeze_encoder_low_level is True and set(finetune.lr_scale.values()) == {0.6}
    pretrain = make_cfg("stage=pretrain").stage
    assert pretrain.freeze_encoder_low_level is False and set(pretrain.lr_scale.values()) == {1.0}


def test_fsdp_options_are_visible_with_their_defaults_under_every_trainer(make_cfg):
    """trainer.fsdp is in every composed trainer (so `--cfg job` shows it) with fsdp_strategy's defaults,
    and never reaches Lightning's Trainer."""
    import inspect

    from omegaconf import OmegaConf

    from vlm.training.distributed import fsdp_strategy, trainer_arguments

    defaults = {
        name: p.default
        for name, p in inspect.signature(fsdp_strategy).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    for option in options("trainer"):
        cfg = make_cfg(f"trainer={option}")
        assert OmegaConf.to_container(cfg.trainer.fsdp) == defaults, option
        assert cfg.trainer.strategy == {"ddp": "ddp", "fsdp": "fsdp"}.get(option, "auto")
        if cfg.trainer.strategy != "fsdp":  # fsdp needs the model (tests/test_distributed.py)
            trainer_cfg, built = trainer_arguments(cfg, None)
            assert "fsdp" not in trainer_cfg and built == {}


def test_every_llm_option_takes_the_one_lora_block(make_cfg):
    """llm.lora is defined once (conf/llm/shared/lora.yaml) and set per run as before."""
    import re

    from omegaconf import OmegaConf

    shared = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "llm" / "shared" / "lora.yaml"))
    assert shared["r"] == 0
    for option in options("llm"):
        assert not re.search(r"^lora:", (CONFIG_DIR / "llm" / f"{option}.yaml").read_text(), re.M), option
        cfg = make_cfg(f"llm={option}", "llm.lora.r=8", tiny=False)
        assert OmegaConf.to_container(cfg.llm.lora) == {**shared, "r": 8}, option
    assert make_cfg("stage=sft_lora").llm.lora == {**shared, "r": 16, "alpha": 32}
