"""Export: ONNX with QDQ nodes and integer weights (checked in onnxruntime), and a packed
integer file with a loader that dequantizes it back to float weights."""

from .check import ExportCheck, ExportError
from .formats import EXPORT_FORMATS, ExportFormat, ExportOptions, export_run, register_format
from .integer_view import (GridQuantizer, InputGrid, IntegerWeight, OutputPointGrid, input_grid,
                           integer_weight)
from .packed import (IntegerExport, IntegerModel, export_integer, load_integer, pack_bits,
                     unpack_bits)
from .onnx import (STORAGE_CHOICES, OnnxExport, export_float_onnx, export_onnx, fp32_bytes,
                   runtime_narrow_bits)
from .runtime import WEIGHTS_KEY, Agreement, OnnxModel, compare

__all__ = [
    "GridQuantizer", "InputGrid", "IntegerWeight", "OutputPointGrid", "input_grid",
    "integer_weight", "IntegerExport",
    "IntegerModel", "export_integer", "load_integer", "pack_bits", "unpack_bits",
    "STORAGE_CHOICES", "OnnxExport", "export_onnx", "runtime_narrow_bits", "Agreement",
    "OnnxModel", "compare", "WEIGHTS_KEY", "EXPORT_FORMATS", "ExportFormat", "ExportOptions",
    "export_run", "register_format", "ExportCheck", "ExportError", "fp32_bytes",
    "export_float_onnx",
]
