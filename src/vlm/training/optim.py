"""AdamW parameter groups per model part and a warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(parts: dict[str, nn.Module], lrs: dict[str, float], weight_decay: float) -> list[dict]:
    """Two groups per trainable part: matrices with weight decay, norms/biases/vectors without."""
    groups = []
    for name, module in parts.items():
        params = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        for group_params, wd, suffix in ((decay, weight_decay, ""), (no_decay, 0.0, "_no_decay")):
            if group_params:
                groups.append(
                    {"params": group_params, "lr": lrs[name], "weight_decay": wd, "name": name + suffix}
                )
    if not groups:
        raise ValueError("the stage leaves no trainable parameters")
    return groups


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to each group's lr, then cosine decay to `min_lr_ratio` of it at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
