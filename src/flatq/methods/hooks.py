"""Forward hooks that methods attach to models: feature capture by layer name."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError


def select_layers(patterns: Iterable[str], candidates: list[str], what: str = "layer") -> list[str]:
    """Names among `candidates` that match any fnmatch pattern (all of them when none given);
    patterns that match nothing are a ConfigError naming `what` was being chosen."""
    patterns = list(patterns)
    if not patterns:
        return list(candidates)
    chosen = [n for n in candidates if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        shown = ", ".join(candidates[:6]) + (", ..." if len(candidates) > 6 else "")
        raise ConfigError(f"{what} patterns {patterns} match none of the candidates "
                          f"({shown or 'none'})")
    return chosen


class FeatureCapture:
    """Keeps the output (or, with `inputs=True`, the first input) of each named module from
    the latest forward pass.

    Used for distillation: the student's tensors keep their graph (the loss flows back
    through them), the teacher's are produced under no_grad. `take()` after each use so
    nothing outlives its step. `transform(name, tensor)`, when given, is what is kept: it runs
    inside the hook, before any later (in-place) op can change the tensor. Built with
    `on=False`, it keeps nothing outside `recording()` blocks, so forward passes that are not
    the method's own (evaluation, BatchNorm re-estimation) cost nothing.
    """

    def __init__(self, model: nn.Module, names: list[str], inputs: bool = False,
                 transform: Callable[[str, Tensor], Any] | None = None, on: bool = True) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"no module named {missing[0]!r} in the model")
        self.names = names
        self.transform, self.on = transform, on
        self.outputs: dict[str, Any] = {}
        self._handles = [modules[n].register_forward_pre_hook(self._pre_hook(n)) if inputs
                         else modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def store(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            self._keep(name, output)
        return store

    def _pre_hook(self, name: str):
        def store(module: nn.Module, inputs: tuple) -> None:
            self._keep(name, inputs[0])
        return store

    def _keep(self, name: str, tensor: Tensor) -> None:
        if self.on:
            self.outputs[name] = tensor if self.transform is None else self.transform(name, tensor)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Capture inside the block (whatever `on` was before, it is restored after)."""
        previous, self.on = self.on, True
        try:
            yield
        finally:
            self.on = previous

    def take(self) -> list[Any]:
        """The captured outputs (or what `transform` made of them) in `names` order; the
        capture is emptied."""
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RuntimeError(f"layer {missing[0]!r} did not run in the last forward pass")
        outputs = [self.outputs[n] for n in self.names]
        self.outputs = {}
        return outputs

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.outputs = {}
