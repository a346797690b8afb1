"""Model registry: maps a name such as ``resnet18`` to a factory of (num_classes, in_channels).

Names with a ':' (``torchvision:resnet50``, ``package.module:factory``) are resolved by
`external.py` instead, so every entry point that takes a model name takes those too.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn

from ..errors import ConfigError
from .external import build_external, check_external, is_external

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Register a factory (function or nn.Module class) taking ``num_classes`` and ``in_channels``.

    Registering the same name twice is a programming error and raises ValueError.
    """

    def decorator(factory: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def _check_positive(value: int, parameter: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{parameter} must be an integer >= 1, got {value!r}")


def check_model_name(name: str) -> None:
    """Refuse a model name the registry does not know (before any data is loaded for it);
    a `torchvision:NAME` or `module:factory` name must resolve."""
    if is_external(name):
        check_external(name)
    elif name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(available_models())}, "
                          "torchvision:NAME or package.module:factory")


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build model ``name`` for ``in_channels``-channel inputs and ``num_classes`` outputs."""
    check_model_name(name)
    _check_positive(num_classes, "num_classes")
    _check_positive(in_channels, "in_channels")
    if is_external(name):
        return build_external(name, num_classes, in_channels)
    return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels)
