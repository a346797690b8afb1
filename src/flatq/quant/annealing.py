"""The schedule Nagel et al.'s oscillation remedies share (their code's defaults): a value held
for the first quarter of training, then a cosine to its final value at the end."""

from __future__ import annotations

import math

ANNEAL_START = 0.25   # where the cosine starts, as a fraction of training


def cosine_anneal(start: float, final: float, progress: float) -> float:
    """`start` until ANNEAL_START, then a cosine from `start` to `final` at progress 1."""
    if progress < ANNEAL_START:
        return start
    r = min((progress - ANNEAL_START) / (1.0 - ANNEAL_START), 1.0)
    return final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * r))
