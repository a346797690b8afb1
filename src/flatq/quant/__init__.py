"""The quantization core: fake-quant math, quantizers, quantized layers, model conversion."""

from .attention import QuantMultiheadAttention
from .convert import calibrate, describe, layer_plan, named_quantizers, quantize_model
from .functional import fake_quantize, grid_integers, integer_range
from .layers import QuantConv1d, QuantConv2d, QuantLinear, is_quant_layer, quant_layers
from .plan import QuantPlan, plan_quantization
from .ptq import post_training_quantize
from .quantizers import (QUANTIZERS, DoReFaWeightQuantizer, LSQPlusQuantizer, LSQQuantizer,
                         MinMaxQuantizer, PACTQuantizer, Quantizer, quantizer_family,
                         register_quantizer)

__all__ = [
    "calibrate", "describe", "layer_plan", "quantize_model", "named_quantizers", "fake_quantize",
    "grid_integers", "integer_range", "QuantConv1d", "QuantConv2d", "QuantLinear",
    "QuantMultiheadAttention", "is_quant_layer", "quant_layers", "QuantPlan", "plan_quantization",
    "QUANTIZERS", "DoReFaWeightQuantizer", "LSQPlusQuantizer", "LSQQuantizer", "MinMaxQuantizer",
    "PACTQuantizer", "Quantizer", "post_training_quantize", "quantizer_family",
    "register_quantizer",
]
