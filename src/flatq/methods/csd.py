"""Channel-wise Standardization Distillation (FPQ paper, Sec. 3.3).

Each captured layer output is standardized per channel over (batch, H, W); the student's
and the teacher's standardized maps are compared by squared error, averaged over elements
within a layer (the paper writes a plain sum, which at batch 256 is thousands of times larger
than the cross-entropy) and summed over layers.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def channel_standardize(z: Tensor, eps: float = 1e-5) -> Tensor:
    """(z - mean) / sqrt(var + eps), statistics per channel (dim 1) over all other dims."""
    dims = [d for d in range(z.dim()) if d != 1]
    mean = z.mean(dim=dims, keepdim=True)
    var = z.var(dim=dims, unbiased=False, keepdim=True)
    return (z - mean) / (var + eps).sqrt()


def csd_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], eps: float = 1e-5) -> Tensor:
    """Sum over layers of the mean squared difference of channel-standardized outputs."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"CSD needs matching non-empty layer lists, got {len(student)} and "
                         f"{len(teacher)}")
    total = 0.0
    for zs, zt in zip(student, teacher):
        diff = channel_standardize(zt.float().detach(), eps) - channel_standardize(zs.float(), eps)
        total = total + diff.pow(2).mean()
    return total
