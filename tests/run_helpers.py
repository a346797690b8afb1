"""Stopping an in-process run at a chosen step, as a crash would (for resume tests)."""

from __future__ import annotations


class Interrupted(Exception):
    """Raised by `interrupt_at`'s callback: the run stops there, its last checkpoint kept."""


def interrupt_at(step: int):
    """A step callback (`qat`/`pretrain` callbacks=) that raises Interrupted after `step`."""
    def callback(at, objective, images, labels):
        if at == step:
            raise Interrupted
    return callback
