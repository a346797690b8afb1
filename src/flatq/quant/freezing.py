"""Iterative freezing of oscillating weights (Nagel, Fournarakis, Bondarenko, Blankevoort,
"Overcoming Oscillations in Quantization-Aware Training", ICML 2022, Sec. 4.2).

With the straight-through estimator a latent weight near a rounding threshold keeps crossing
it, so its integer flips back and forth between two grid points; at 2 bits that moves the test
accuracy by a point between evaluations and leaves the BatchNorm statistics averaged over
networks that keep changing (docs/soundness.md). After every optimizer step this tracks each
low-bit weight's integer: an *oscillation* is a change of the integer in the direction opposite
to its previous change, and its frequency is an exponential moving average (momentum m) of
those events per step. A weight whose frequency exceeds a threshold is frozen for the rest of
training to its most common recent integer (the rounded moving average of its integers).

Frozen weights are pinned rather than masked in the forward: after every step the latent weight
is set to the centre of its frozen bin under the current grid, (k - z) s, so the quantizer
itself returns the frozen integer k, and every reader of the weight (forward, export, dead-channel
count, the saved model) sees it without knowing about freezing. The step size's gradient sees a
frozen weight as a weight at its bin centre (LSQ's straight-through term round(w/s) - w/s = 0)
rather than as the constant integer k it is (k - z): frozen weights do not pull the step size.

The threshold follows the paper's code: a start value until a quarter of training, then a
cosine from it to the final threshold at the end. Only weights on a learned grid (LSQ, LSQ+) at
up to MAX_BITS bits are tracked (the paper's code stops at 4 bits); min-max weights (the 8-bit
edges) follow the weights' own range and cannot be pinned.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from .annealing import cosine_anneal
from .functional import grid_integers
from .layers import quant_layers
from .quantizers import DoReFaWeightQuantizer, MinMaxQuantizer

MAX_BITS = 4             # widest weights tracked (the paper's code's default)
START_THRESHOLD = 0.1    # the threshold before the cosine (the paper's code's ImageNet setting)


def freezing_threshold(final: float, progress: float) -> float:
    """The frequency above which a weight freezes at `progress` (step / total steps)."""
    return cosine_anneal(START_THRESHOLD, final, progress)


def weight_integers(layer: nn.Module,
                    grid: tuple[Tensor, Tensor, int, int] | None = None) -> Tensor:
    """The layer's weight as integers of its quantizer's grid, clamp(round(w / s) + z)
    (`grid`: the layer's weight_grid() when the caller has already read it)."""
    scale, zero_point, lo, hi = layer.weight_grid() if grid is None else grid
    return grid_integers(layer.weight.detach(), scale, zero_point).clamp_(lo, hi)


def trackable(layer: nn.Module) -> bool:
    """Whether the layer's weights sit on a learned grid narrow enough to track."""
    quantizer = layer.weight_quantizer
    return (quantizer.bits <= MAX_BITS
            and not isinstance(quantizer, (MinMaxQuantizer, DoReFaWeightQuantizer)))


class OscillationTracker:
    """One layer's oscillation statistics and frozen weights (per weight element)."""

    def __init__(self, integers: Tensor) -> None:
        self.previous = integers.clone()             # the integers after the last step
        self.last_direction = torch.zeros_like(integers)  # sign of the last change, 0: none yet
        self.frequency = torch.zeros_like(integers)  # EMA of oscillations per step
        self.mean = integers.clone()                 # EMA of the integers
        self.frozen = torch.zeros_like(integers, dtype=torch.bool)
        self.frozen_integers = torch.zeros_like(integers)

    def update(self, integers: Tensor, momentum: float, threshold: float) -> None:
        """Count this step's oscillations and freeze the weights now above `threshold`."""
        direction = torch.sign(integers - self.previous)
        oscillated = (direction * self.last_direction) == -1
        self.frequency.mul_(1 - momentum).add_(oscillated.to(integers.dtype), alpha=momentum)
        changed = direction != 0
        self.last_direction[changed] = direction[changed]
        self.previous.copy_(integers)
        freeze = (self.frequency > threshold) & ~self.frozen
        self.frozen_integers[freeze] = torch.round(self.mean[freeze])
        self.frozen |= freeze
        self.mean.mul_(1 - momentum).add_(integers, alpha=momentum)

    def state_dict(self) -> dict[str, Tensor]:
        return {name: value.clone() for name, value in vars(self).items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name, value in vars(self).items():
            value.copy_(state[name])


class WeightFreezing:
    """Iterative freezing for every trackable quantized layer of `model`.

    Call `update(progress)` after every optimizer step; `state_dict` / `load_state_dict` carry
    the statistics through a checkpoint, so a resumed run freezes the same weights.
    """

    def __init__(self, model: nn.Module, final_threshold: float, momentum: float) -> None:
        learned = [(name, layer) for name, layer in quant_layers(model) if trackable(layer)]
        if not learned:
            raise ConfigError(
                f"freezing oscillating weights (--freeze-oscillations) needs weights quantized "
                f"to at most {MAX_BITS} bits on a learned grid (LSQ, LSQ+); this model has none "
                "(min-max, DoReFa and wider weights are not tracked)")
        self.layers = dict(learned)
        self.final_threshold, self.momentum = final_threshold, momentum
        with torch.no_grad():
            self.trackers = {name: OscillationTracker(weight_integers(layer))
                             for name, layer in self.layers.items()}

    @torch.no_grad()
    def update(self, progress: float) -> None:
        """Track the integers after this step, freeze new oscillators, pin every frozen one.

        Pinning runs on every layer, frozen weights or not (a no-op where none is), so that no
        step waits on the device to ask whether any weight is frozen."""
        threshold = freezing_threshold(self.final_threshold, progress)
        for name, layer in self.layers.items():
            tracker = self.trackers[name]
            grid = layer.weight_grid()
            tracker.update(weight_integers(layer, grid), self.momentum, threshold)
            scale, zero_point = grid[0], grid[1]
            centres = ((tracker.frozen_integers - zero_point) * scale).to(layer.weight.dtype)
            layer.weight.copy_(torch.where(tracker.frozen, centres, layer.weight))

    def frozen_count(self) -> tuple[int, int]:
        """(frozen weights, tracked weights)."""
        frozen = sum(int(t.frozen.sum()) for t in self.trackers.values())
        return frozen, sum(t.frozen.numel() for t in self.trackers.values())

    def state_dict(self) -> dict[str, Any]:
        return {name: tracker.state_dict() for name, tracker in self.trackers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.trackers):
            raise CheckpointError(f"the checkpoint's oscillation statistics cover the layers "
                                  f"{sorted(state)}, this model's {sorted(self.trackers)}")
        for name, tracker in self.trackers.items():
            tracker.load_state_dict(state[name])
