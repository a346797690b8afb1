"""||grad_w L||: the size of the loss gradient w.r.t. the layer weights (FPQ paper, Fig. 2).

Two readings are logged while training. `grad_norm` is the gradient the optimizer just
applied: that of the method's whole objective (for FPQ: CE under feature noise plus the CSD
term), free to read. `task_grad_norm` is that of the task loss alone, on the same batch, with
the model in eval mode: the same function whose Hessian trace `hessian_trace` logs, so it
compares across methods whose objectives differ in scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .hessian import batch_loss
from .params import layer_weights
from .measuring import measuring


def _norm(grads: Iterable[Tensor]) -> float:
    return math.sqrt(sum(float(torch.linalg.vector_norm(g.float())) ** 2 for g in grads))


def grad_norm(model: nn.Module) -> float | None:
    """Euclidean norm of the layer weights' current `.grad`, over all layers together.

    Reads the gradients left by the last backward pass (the optimizer does not clear them
    until the next step); None when no weight has a gradient.
    """
    grads = [w.grad for _, w in layer_weights(model) if w.grad is not None]
    return _norm(grads) if grads else None


def task_grad_norm(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """||d CE / d w|| over the layer weights for one batch, model in eval mode (buffers and
    modes restored by `measuring`); `.grad` is left untouched."""
    weights = [w for _, w in layer_weights(model)]
    with measuring(model):
        grads = torch.autograd.grad(batch_loss(model, images, labels), weights,
                                    allow_unused=True, materialize_grads=True)
    return _norm(grads)
