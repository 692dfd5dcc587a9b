"""Trainer arguments that depend on the built model: the FSDP strategy and its gradient clipping.

`trainer=fsdp` names the strategy `fsdp`; its options are the `trainer.fsdp` block (conf/trainer/default.yaml). The wrap policy needs
the classes of the model's transformer blocks, known only once the parts are built (the encoder and the LLM
report them as `block_classes`), so the strategy is built here from the instantiated module instead of by a
YAML `_target_`. Every other strategy (`ddp`, `auto`, ...) goes to Lightning as configured: frozen parameters
do not require gradients, so DDP leaves them out and needs no `find_unused_parameters`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf
from torch import nn

STATE_DICT_TYPES = ("full", "sharded")


def block_classes(module: nn.Module) -> set[type[nn.Module]]:
    """The transformer block classes that `module`'s parts report (`block_classes` of encoder and LLM)."""
    return {cls for part in module.modules() for cls in getattr(part, "block_classes", ())}


def check_uniform_dtypes(module: nn.Module, classes: set[type[nn.Module]]) -> None:
    """FSDP flattens each unit's parameters into one tensor of one dtype; name a unit that mixes dtypes
    (e.g. `llm.dtype=bfloat16` puts the LLM's embeddings in bf16 next to a float32 projector)."""
    units = [name for name, m in module.named_modules() if isinstance(m, tuple(classes))]
    dtypes: dict[str, dict[Any, str]] = {}
    for name, param in module.named_parameters():
        unit = max((u for u in units if name.startswith(u + ".")), key=len, default="")
        dtypes.setdefault(unit, {}).setdefault(param.dtype, name)
    for unit, found in dtypes.items():
        if len(found) > 1:
            examples = ", ".join(f"{name} ({dtype})" for dtype, name in found.items())
            where = unit or "the root unit (every parameter outside the block classes)"
            raise ValueError(
                f"trainer=fsdp cannot wrap {where}: its parameters mix dtypes ({examples}); keep the parts in "
                f"one dtype (e.g. llm.dtype=float32) or use trainer=ddp"
            )


def fsdp_strategy(
    module: nn.Module,
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: str = "full",
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
) -> FSDPStrategy:
    """Lightning's FSDPStrategy for `module`: one FSDP unit per block of the parts' `block_classes`, the
    rest in the root unit; the same classes recomputed in backward when `activation_checkpointing`.

    `use_orig_params=True` lets a unit hold frozen and trainable parameters together (a frozen LLM's
    embeddings next to a trainable projector) and the optimizer see the original parameters.
    """
    from torch.distributed.fsdp import ShardingStrategy

    classes = block_classes(module)
    if not classes:
        raise ValueError(
            f"trainer=fsdp: no part of {type(module).__name__} reports block_classes, so the whole model "
            f"would be one FSDP unit; use trainer=ddp"
        )
    if sharding_strategy.upper() not in ShardingStrategy.__members__:
        raise ValueError(
            f"trainer.fsdp.sharding_strategy={sharding_strategy!r}; choose one of "
            f"{', '.join(ShardingStrategy.__members__)}"
        )
    if state_dict_type not in STATE_DICT_TYPES:
        raise ValueError(
            f"trainer.fsdp.state_dict_type={state_dict_type!r}; choose one of {', '.join(STATE_DICT_TYPES)}"
        )
    check_uniform_dtypes(module, classes)
    return FSDPStrategy(
        auto_wrap_policy=classes,
        activation_checkpointing_policy=classes if activation_checkpointing else None,
        sharding_strategy=sharding_strategy.upper(),
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
        use_orig_params=True,
    )


class FSDPGradientClipping(L.Callback):
    """Clips the gradients' global norm through FSDP's own `clip_grad_norm_`, which reduces over the shards
    (Lightning refuses `gradient_clip_val` under FSDP: a local norm of each shard would be wrong)."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        trainer.strategy.model.clip_grad_norm_(self.max_norm)


def trainer_arguments(cfg: DictConfig, module: nn.Module | None) -> tuple[dict, dict[str, Any]]:
    """(config, built): `cfg.trainer` for `instantiate`, and the arguments built in code that go with it;
    under `trainer=fsdp` the `strategy` for `module` and its `callbacks` (gradient clipping)."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    options = trainer.pop("fsdp", None) or {}
    if trainer.get("strategy") != "fsdp":
        return trainer, {}
    if module is None:
        raise ValueError(
            "trainer.strategy=fsdp wraps the model's blocks, but this caller builds the trainer without the "
            "model (eval.py: use trainer=default or trainer=ddp)"
        )
    own = [f"{part}.activation_checkpointing" for part in ("encoder", "llm") if _flag(cfg, part)]
    if options.get("activation_checkpointing") and own:
        raise ValueError(
            f"trainer.fsdp.activation_checkpointing=true and {', '.join(own)}=true would recompute the same "
            f"blocks twice; set one of them"
        )
    built: dict[str, Any] = {"strategy": fsdp_strategy(module, **options), "callbacks": []}
    max_norm = trainer.pop("gradient_clip_val", None)
    if max_norm:
        built["callbacks"].append(FSDPGradientClipping(float(max_norm)))
    return trainer, built


def _flag(cfg: DictConfig, part: str) -> bool:
    return bool(OmegaConf.select(cfg, f"{part}.activation_checkpointing", default=False))
