"""Analyses measure a model without changing it: eval mode, and every buffer put back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def measuring(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body with `model` in eval mode; afterwards restore each module's own
    train/eval flag and copy every buffer (BatchNorm running statistics, quantizer state)
    back bit for bit.

    Eval mode means BatchNorm normalizes with its running statistics and does not update
    them, while the quantizers keep fake-quantizing (they do so in eval mode too), so the
    quantities measured are those of the deployed quantized network.
    """
    modes = {module: module.training for module in model.modules()}
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    model.eval()
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in buffers:
                    buf.copy_(buffers[name])
        for module, mode in modes.items():
            module.training = mode
