"""LoRA on any LLM backbone through peft: adapters injected in place, merged for export.

`llm.lora.r > 0` injects LoRA adapters into the LLM's linear layers (`target_modules`: peft's
"all-linear" or a list of module names) and freezes every other LLM weight, so a stage that trains the
LLM trains only the adapters (a stage that freezes the LLM freezes them too). Lightning checkpoints hold
the adapters next to the frozen base weights, which is what resuming needs;

    python -m vlm.app.lora merge <in.ckpt> <out.ckpt>

(`vlm.training.checkpointing.merge_lora_checkpoint`) writes a checkpoint with every adapter merged into its base weight (and `lora.r = 0` in its config), which
`eval.py ckpt_path=<out.ckpt>` loads like any other; `adapter_state_dict` gives the adapters alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

ADAPTER = "lora_"  # every LoRA parameter's name holds this


def apply_lora(llm: nn.Module, lora: Mapping | None) -> nn.Module:
    """Inject LoRA adapters (`lora`: r, alpha, dropout, target_modules) into `llm` in place; r = 0 or
    no `lora` leaves it unchanged. Only the adapters stay trainable."""
    if not lora or not lora.get("r"):
        return llm
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora.get("target_modules", "all-linear")
    config = LoraConfig(
        r=int(lora["r"]),
        lora_alpha=float(lora.get("alpha", 2 * lora["r"])),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=targets if isinstance(targets, str) else list(targets),
        exclude_modules=list(lora.get("exclude_modules", ["lm_head"])),
    )
    try:
        inject_adapter_in_model(config, llm)
    except ValueError as error:  # peft's NoMatchingPeftModuleError says nothing about this model
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in llm.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(
            f"llm.lora.target_modules={list(targets) if not isinstance(targets, str) else targets} matched "
            f"no linear layer of {type(llm).__name__}; its linear layers: {', '.join(linear)}"
        ) from error
    adapters = 0
    for name, param in llm.named_parameters():
        param.requires_grad_(ADAPTER in name)
        adapters += param.numel() if ADAPTER in name else 0
    log.info("LoRA r=%s on %s: %.2fM adapter parameters", lora["r"], targets, adapters / 1e6)
    return llm


def has_lora(module: nn.Module) -> bool:
    return any(ADAPTER in name for name, _ in module.named_parameters())


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights alone, under their names in `module`."""
    return {name: value for name, value in module.state_dict().items() if ADAPTER in name}


def merge_lora(module: nn.Module) -> nn.Module:
    """Merge every LoRA adapter in `module` into its base layer and put the plain layer back."""
    from peft.tuners.lora import LoraLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
    return module
