"""||grad_w L||: the size of the gradient the optimizer just applied (FPQ paper, Fig. 2)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .params import layer_weights


def grad_norm(model: nn.Module) -> float | None:
    """Euclidean norm of the layer weights' current `.grad`, over all layers together.

    Reads the gradients left by the last backward pass (the optimizer does not clear them
    until the next step); None when no weight has a gradient.
    """
    grads = [w.grad for _, w in layer_weights(model) if w.grad is not None]
    if not grads:
        return None
    return math.sqrt(sum(float(torch.linalg.vector_norm(g.float())) ** 2 for g in grads))
