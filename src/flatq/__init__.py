"""flatq: low-bit quantization-aware training that seeks flat minima."""

from .config import DataConfig, QuantConfig, RunConfig, TrainConfig
from .errors import FlatqError
from .quant import calibrate, post_training_quantize, quantize_model
# Importing the methods registers their configs, so that `RunConfig.from_dict({"method": ...})`
# and `method_config(name)` know every method after a plain `import flatq` (config.py sits
# below the methods and cannot import them itself).
from . import methods  # noqa: F401
from .allocator import retain_freed_host_memory

__version__ = "0.1.0"
__all__ = ["DataConfig", "QuantConfig", "RunConfig", "TrainConfig", "FlatqError", "calibrate",
           "post_training_quantize", "quantize_model", "retain_freed_host_memory", "__version__"]
