"""Statistics gathered during calibration, from which quantizers take their initial ranges."""

from __future__ import annotations

from collections.abc import Callable

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


RANGE_METHODS = ("minmax", "percentile", "mse")


class SampleObserver(MinMaxObserver):
    """Min-max statistics plus a bounded uniform random sample of the observed values.

    Clipping methods need the distribution, not just its extremes. Every value seen gets a
    random key and the `max_samples` values with the smallest keys are kept (per channel), which
    is a uniform sample without replacement of everything observed, in bounded memory. The keys
    come from a seeded generator, so calibration is reproducible.
    """

    def __init__(self, per_channel: bool, max_samples: int = 2 ** 16, seed: int = 0) -> None:
        super().__init__(per_channel)
        self.max_samples = max_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: Tensor | None = None
        self.keys: Tensor | None = None
        self._stamp: tuple[int, int] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, nn.Parameter):
            # A weight comes back unchanged with every calibration batch; keep one copy.
            stamp = (x.data_ptr(), x._version)
            if stamp == self._stamp:
                return x
            self._stamp = stamp
        super().forward(x)
        flat = self._flat(x)
        keys = torch.rand(flat.shape, generator=self.generator).to(flat.device)
        if self.samples is not None:
            flat, keys = torch.cat([self.samples, flat], 1), torch.cat([self.keys, keys], 1)
        if flat.shape[1] > self.max_samples:
            keys, index = torch.topk(keys, self.max_samples, dim=1, largest=False)
            flat = torch.gather(flat, 1, index)
        self.samples, self.keys = flat, keys
        return x


class PercentileObserver(SampleObserver):
    """Range from the tails: [P_(100-p), P_p] of the observed values (p = 99.99 by default).

    Both tails are clipped (not |x|), which suits the asymmetric quantizer: a lone outlier on
    either side stops setting the step size. Percentiles are taken on the sample, with linear
    interpolation (torch.quantile).
    """

    def __init__(self, per_channel: bool, percentile: float = 99.99, **kwargs) -> None:
        if not 50.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [50, 100], got {percentile}")
        super().__init__(per_channel, **kwargs)
        self.percentile = percentile

    def range(self) -> tuple[Tensor, Tensor]:
        super().range()
        q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0],
                         device=self.samples.device)
        lo, hi = torch.quantile(self.samples, q, dim=1)
        return lo, hi


class MSEObserver(SampleObserver):
    """The clipping range that minimizes the quantization MSE of the observed values.

    Candidates shrink the min-max range [min, max] by factors k / grid, k = 1..grid (100 by
    default; k = grid is min-max itself), and each candidate is scored by the mean squared
    error of fake-quantizing the sample on the quantizer's own grid: `affine(lo, hi)` gives the
    quantizer's (scale, zero point) for a range and [qmin, qmax] its integer grid. The zero
    point may be fractional (LSQ+'s continuous offset beta = -z s), so the search is LSQ+'s
    argmin over (s, beta) restricted to the ranges [k min, k max]. Ties keep the wider range.
    """

    def __init__(self, per_channel: bool, affine: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
                 qmin: int, qmax: int, grid: int = 100, **kwargs) -> None:
        super().__init__(per_channel, **kwargs)
        self.affine, self.qmin, self.qmax, self.grid = affine, qmin, qmax, grid

    def quantization_mse(self, lo: Tensor, hi: Tensor) -> Tensor:
        """Mean squared quantization error of the sample for the range [lo, hi] (per row)."""
        scale, zero_point = (t.float().reshape(-1, 1) for t in self.affine(lo, hi))
        integers = torch.clamp(torch.round(self.samples / scale + zero_point), self.qmin,
                               self.qmax)
        return ((integers - zero_point) * scale - self.samples).pow(2).mean(dim=1)

    def range(self) -> tuple[Tensor, Tensor]:
        lo_max, hi_max = super().range()
        best_lo, best_hi = lo_max.clone(), hi_max.clone()
        best = self.quantization_mse(lo_max, hi_max)
        for k in range(self.grid - 1, 0, -1):
            lo, hi = lo_max * (k / self.grid), hi_max * (k / self.grid)
            mse = self.quantization_mse(lo, hi)
            better = mse < best
            best = torch.where(better, mse, best)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
        return best_lo, best_hi


def make_observer(method: str, per_channel: bool, *, percentile: float = 99.99,
                  affine: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
                  qmin: int = 0, qmax: int = 255) -> MinMaxObserver:
    """The observer for a range method: 'minmax', 'percentile' or 'mse' (see RANGE_METHODS).

    'mse' needs the quantizer's `affine` map and integer grid to score candidate ranges.
    """
    if method == "minmax":
        return MinMaxObserver(per_channel)
    if method == "percentile":
        return PercentileObserver(per_channel, percentile)
    if method == "mse":
        if affine is None:
            raise ValueError("the mse range method needs the quantizer's affine map")
        return MSEObserver(per_channel, affine, qmin, qmax)
    raise ValueError(f"range method must be one of {RANGE_METHODS}, got {method!r}")
