"""Model zoo: CIFAR-form ResNets and MobileNets and a small ViT, built by name.

Every weight layer is a plain nn.Conv2d or nn.Linear; the stem conv comes first and the classifier
Linear last in ``named_modules()`` order, which quantized layer swaps and first/last-layer
policies rely on. `torchvision:NAME` and `package.module:factory` name models from outside
(see `external.py`).
"""

from . import mobilenet, resnet, vit  # noqa: F401  (importing registers the models)
from .external import load_weights, native_input_size
from .registry import available_models, build_model, check_model_name, register_model

__all__ = ["available_models", "build_model", "check_model_name", "register_model",
           "load_weights", "native_input_size"]
