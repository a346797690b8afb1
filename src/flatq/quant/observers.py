"""Statistics gathered during calibration, from which quantizers take their initial ranges."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MinMaxObserver(nn.Module):
    """Running minimum, maximum and mean |x|, per tensor or per channel (axis 0).

    Kept outside the quantizers' state_dict (no buffers): it lives only while calibrating.
    """

    def __init__(self, per_channel: bool) -> None:
        super().__init__()
        self.per_channel = per_channel
        self.min: Tensor | None = None
        self.max: Tensor | None = None
        self.abs_sum: Tensor | None = None
        self.count = 0

    def _flat(self, x: Tensor) -> Tensor:
        x = x.detach().float()
        return x.reshape(x.shape[0], -1) if self.per_channel else x.reshape(1, -1)

    def forward(self, x: Tensor) -> Tensor:
        flat = self._flat(x)
        lo, hi = torch.aminmax(flat, dim=1)
        abs_sum = flat.abs().sum(dim=1)
        if self.min is None:
            self.min, self.max, self.abs_sum = lo, hi, abs_sum
        else:
            self.min = torch.minimum(self.min, lo)
            self.max = torch.maximum(self.max, hi)
            self.abs_sum = self.abs_sum + abs_sum
        self.count += flat.shape[1]
        return x

    @property
    def seen(self) -> bool:
        return self.min is not None

    def range(self) -> tuple[Tensor, Tensor]:
        """(min, max) of everything observed, one value per channel or a single value."""
        if self.min is None:
            raise RuntimeError("observer has seen no data")
        return self.min, self.max

    def mean_abs(self) -> Tensor:
        if self.abs_sum is None:
            raise RuntimeError("observer has seen no data")
        return self.abs_sum / self.count
