"""SGD with the paper's settings and a per-step cosine schedule with optional warm-up."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TrainConfig
from ..quant.quantizers import Quantizer


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD with one group per (weight decay, learning-rate multiple): the parameters a module
    lists in its `no_weight_decay` (a quantizer's step sizes and offsets: ranges, not weights;
    see `flatq.quant.Quantizer`) get no decay, and all quantizer parameters learn at
    `config.quantizer_lr` times the rate of the weights. Each group keeps its multiple as
    `lr_scale`, so a resume can re-apply the schedule. The weights' group comes first (the
    logged learning rate is its); at multiple 1 the groups are the two of earlier versions, so
    their checkpoints resume."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for module in model.modules():
        exempt = getattr(module, "no_weight_decay", ())
        scale = config.quantizer_lr if isinstance(module, Quantizer) else 1.0
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                groups.setdefault((name in exempt, scale), []).append(param)
    order = sorted(groups, key=lambda key: (key[0], key[1] != 1.0))
    param_groups = [{"params": groups[key], "lr": config.lr * key[1], "lr_scale": key[1],
                     "weight_decay": 0.0 if key[0] else config.weight_decay} for key in order]
    return torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum,
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
