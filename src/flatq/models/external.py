"""Models from outside the registry: `torchvision:NAME` and a user's `package.module:factory`.

A name with a ':' is one of these. `torchvision:NAME` is any classification model of
`torchvision.models` built with `weights=None` (weights come from a local file, see
`load_weights`); `package.module:factory` imports the module (it must be importable: installed,
or on PYTHONPATH) and calls the factory with the keywords of `num_classes` and `in_channels`
it accepts. Every failure is a one-line ConfigError naming what to fix.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

TORCHVISION = "torchvision:"
IMAGENET_SIZE = 224
# Models whose auxiliary heads would turn the training-mode output into a named tuple.
_TORCHVISION_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
                       "inception_v3": {"aux_logits": False, "init_weights": True}}


def is_external(name: str) -> bool:
    """Whether `name` names a model outside the registry (it contains a ':')."""
    return ":" in name


@lru_cache(maxsize=None)
def torchvision_models() -> tuple[str, ...]:
    """The classification models of torchvision.models (no detection, segmentation, video)."""
    from torchvision import models
    return tuple(models.list_models(module=models))


def _torchvision_name(name: str) -> str:
    arch = name[len(TORCHVISION):]
    if arch not in torchvision_models():
        raise ConfigError(f"unknown model {name!r}: torchvision has no classification model "
                          f"{arch!r}; available: {', '.join(torchvision_models())}")
    return arch


def _factory(name: str) -> Callable[..., object]:
    """The callable `package.module:factory` names, imported."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model {name!r}: expected package.module:factory or torchvision:NAME")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"model {name!r}: cannot import module {module_name!r} ({exc}); "
                          "install it or add its folder to PYTHONPATH") from None
    except Exception as exc:   # the user's module failed while importing
        raise ConfigError(f"model {name!r}: importing {module_name!r} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ConfigError(f"model {name!r}: module {module_name!r} has no attribute "
                              f"{attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"model {name!r}: {attr!r} is a {type(factory).__name__}, not a "
                          "callable that builds a model")
    return factory


def check_external(name: str) -> None:
    """Refuse a `torchvision:` or `module:factory` name that cannot build a model."""
    if name.startswith(TORCHVISION):
        _torchvision_name(name)
    else:
        _factory(name)


def _accepted(factory: Callable[..., object], kwargs: dict[str, int]) -> dict[str, int]:
    """The keywords of `kwargs` that `factory` takes (all of them if it takes **kwargs)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):      # a builtin without a signature: try them all
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return kwargs
    names = {p.name for p in parameters}
    return {k: v for k, v in kwargs.items() if k in names}


def build_external(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build `torchvision:NAME` (weights=None) or call a user's factory."""
    if name.startswith(TORCHVISION):
        arch = _torchvision_name(name)
        if in_channels != 3:
            raise ConfigError(f"model {name} takes 3-channel images, the data has "
                              f"{in_channels}; pass --channels 3")
        from torchvision import models
        return models.get_model(arch, weights=None, num_classes=num_classes,
                                **_TORCHVISION_KWARGS.get(arch, {}))
    factory = _factory(name)
    kwargs = _accepted(factory, {"num_classes": num_classes, "in_channels": in_channels})
    try:
        model = factory(**kwargs)
    except Exception as exc:   # the user's code: report it on one line
        raise ConfigError(f"model {name!r}: calling it with {kwargs} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r} returned a {type(model).__name__}, not a "
                          "torch.nn.Module")
    return model


def native_input_size(name: str) -> int | None:
    """The square input size a model is made for: the smallest ImageNet crop size of a
    torchvision model's published weights (299 for inception_v3, 224 for most; the smallest,
    as a ViT built without weights takes 224 where its SWAG weights take 384 or 518), None
    for registry models and users' factories."""
    if not name.startswith(TORCHVISION):
        return None
    from torchvision import models
    crops = [int(w.transforms().crop_size[0])
             for w in models.get_model_weights(_torchvision_name(name))]
    return min(crops, default=IMAGENET_SIZE)


def check_weights_file(path: str | Path) -> Path:
    """`path` as a Path, refused when there is no such file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--pretrained {path}: no such file")
    return path


def load_weights(model: nn.Module, path: str | Path, name: str) -> None:
    """Load a local weights file (a state_dict saved with torch.save, or a checkpoint holding
    one under 'state_dict' or 'model') into `model`; a file that does not fit is refused with
    the keys and shapes that differ."""
    path = check_weights_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # unpickling errors come in many types
        raise ConfigError(f"--pretrained {path}: not a weights file torch.load can read "
                          f"safely ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
                          ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"--pretrained {path}: holds a {type(state).__name__}, not a "
                          "state_dict")
    problem = weights_mismatch(model.state_dict(), state)
    if problem:
        raise ConfigError(f"--pretrained {path} does not fit model {name}: {problem}")
    model.load_state_dict(state)


def weights_mismatch(expected: dict, given: dict) -> str | None:
    """How `given` differs from `expected` in keys and shapes (a few of each), or None."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} (model: {tuple(v.shape)})"
              for k, v in expected.items()
              if k in given and getattr(given[k], "shape", None) != v.shape]
    parts = [f"{label} {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
             for label, items in (("shapes differ:", shapes), ("missing:", missing),
                                  ("unexpected:", unexpected)) if items]
    return "; ".join(parts) or None
