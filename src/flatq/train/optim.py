"""SGD with the paper's settings and a per-step cosine schedule with optional warm-up."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD over `model`'s trainable parameters in two groups: with `config.weight_decay`, and
    without it for the parameters a module lists in its `no_weight_decay` (a quantizer's step
    sizes and offsets: ranges, not weights; see `flatq.quant.Quantizer`)."""
    decay, no_decay = [], []
    for module in model.modules():
        exempt = getattr(module, "no_weight_decay", ())
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            skip = name in exempt
            (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=config.lr,
                           momentum=config.momentum,
                           nesterov=config.nesterov and config.momentum > 0)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for `warmup_steps`, then cosine annealing to zero at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
