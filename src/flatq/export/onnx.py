"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ) nodes and integer weights.

Each quantized layer becomes

    input -> QuantizeLinear(s_x, z_x) [-> Clip(lo, hi)] -> DequantizeLinear(s_x, z_x) --+
    weight_q (integer initializer) -> DequantizeLinear(s_w, z_w, axis=0) ------------> Conv/Gemm/MatMul

and everything else (BatchNorm, residual adds, attention) is exported as trained. The graph
comes from torch's TorchScript exporter: the quantized layers are swapped for modules whose
autograd Functions carry an ONNX `symbolic`, with the integers, scales and zero points as named
buffers (hence named initializers). The exporter knows only 8-bit integer types (opset <= 20);
afterwards the 2- and 4-bit tensors are retyped to INT2/UINT2 (opset 25) and INT4/UINT4
(opset 21) where onnxruntime runs them ("narrow" storage). Otherwise they stay int8/uint8
holding only values of their bit width, and a Clip on the quantized input keeps activations
on the narrow grid, which QuantizeLinear alone would saturate only to the 8-bit range.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper, version_converter
from torch import Tensor, nn

from ..errors import ConfigError
from ..quant import integer_range, quant_layers
from .integer_view import check_exportable, input_grid, integer_weight

STORAGE_CHOICES = ("auto", "narrow", "int8")
EXPORTER_OPSET = 20  # the newest opset of torch's TorchScript exporter
NARROW_OPSET = {4: 21, 2: 25}  # first opset with (U)INT4 / (U)INT2 in QuantizeLinear
NARROW_TYPES = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
                (2, True): TensorProto.INT2, (2, False): TensorProto.UINT2}


class _QuantDequant(torch.autograd.Function):
    """x -> QuantizeLinear [-> Clip(lo, hi)] -> DequantizeLinear, per tensor.

    The forward mirrors ONNX's order of operations (round(x / s) + z); it serves tracing only.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, lo: int, hi: int,
                clip: bool) -> Tensor:
        z = zero_point.float()
        return (torch.clamp(torch.round(x / scale) + z, lo, hi) - z) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, lo: int, hi: int, clip: bool):
        q = g.op("QuantizeLinear", x, scale, zero_point)
        if clip:
            dtype = torch.int8 if lo < 0 else torch.uint8  # signed grids always reach below 0
            q = g.op("Clip", q, g.op("Constant", value_t=torch.tensor(lo, dtype=dtype)),
                     g.op("Constant", value_t=torch.tensor(hi, dtype=dtype)))
        return g.op("DequantizeLinear", q, scale, zero_point)


class _DequantizeWeight(torch.autograd.Function):
    """Integer weight -> DequantizeLinear with per-output-channel (axis 0) scale and zero point."""

    @staticmethod
    def forward(ctx, q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (q.dim() - 1)
        return (q.float() - zero_point.float().view(shape)) * scale.view(shape)

    @staticmethod
    def symbolic(g, q, scale, zero_point):
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=0)


@dataclass(frozen=True)
class LayerStorage:
    """How one quantized layer was written: bit widths and ONNX element types."""

    name: str
    w_bits: int
    a_bits: int
    weight_type: str
    input_type: str
    clipped: bool  # a Clip keeps the input on a grid narrower than its storage type


def _type_name(bits: int, signed: bool, narrow: bool) -> str:
    stored = bits if narrow else 8
    return f"{'' if signed else 'u'}int{stored}"


class _ExportLayer(nn.Module):
    """Stand-in for a QuantConv2d/QuantLinear during export: integer buffers, QDQ Functions."""

    def __init__(self, name: str, layer: nn.Module, narrow_bits: frozenset[int]) -> None:
        super().__init__()
        weight, grid = integer_weight(layer), input_grid(layer)
        w_dtype = torch.int8 if weight.signed else torch.uint8
        a_dtype = torch.int8 if grid.signed else torch.uint8
        self.register_buffer("weight_q", weight.q.to(w_dtype))
        self.register_buffer("weight_scale", weight.scale)
        self.register_buffer("weight_zero_point", weight.zero_point.to(w_dtype))
        self.register_buffer("input_scale", torch.tensor(grid.scale, dtype=torch.float32))
        self.register_buffer("input_zero_point", torch.tensor(grid.zero_point, dtype=a_dtype))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.op = nn.functional.linear if layer.kind == "linear" else layer._conv_forward
        w_narrow = weight.bits in narrow_bits
        a_narrow = (grid.bits in narrow_bits
                    and (grid.lo, grid.hi) == integer_range(grid.bits, grid.signed))
        self.lo, self.hi = grid.lo, grid.hi
        self.clip = (grid.lo, grid.hi) != integer_range(grid.bits if a_narrow else 8, grid.signed)
        self.storage = LayerStorage(name, weight.bits, grid.bits,
                                    _type_name(weight.bits, weight.signed, w_narrow),
                                    _type_name(grid.bits, grid.signed, a_narrow), self.clip)
        self.narrow = {f"{name}.weight_q": (weight.bits, weight.signed)} if w_narrow else {}
        if w_narrow:
            self.narrow[f"{name}.weight_zero_point"] = (weight.bits, weight.signed)
        if a_narrow:
            self.narrow[f"{name}.input_zero_point"] = (grid.bits, grid.signed)

    def forward(self, x: Tensor) -> Tensor:
        x = _QuantDequant.apply(x, self.input_scale, self.input_zero_point, self.lo, self.hi,
                                self.clip)
        return self.op(x, _DequantizeWeight.apply(self.weight_q, self.weight_scale,
                                                  self.weight_zero_point), self.bias)


@dataclass
class OnnxExport:
    """What `export_onnx` wrote: the path, the opset and each quantized layer's storage."""

    path: Path
    opset: int
    layers: list[LayerStorage] = field(default_factory=list)

    def storage_summary(self) -> str:
        """One line: which element types hold the weights and quantized inputs."""
        kinds: dict[str, set[str]] = {}
        for layer in self.layers:
            kinds.setdefault(f"{layer.w_bits}-bit weights", set()).add(layer.weight_type)
            kinds.setdefault(f"{layer.a_bits}-bit inputs", set()).add(
                layer.input_type + (" + Clip" if layer.clipped else ""))
        return "; ".join(f"{k} as {'/'.join(sorted(v))}" for k, v in sorted(kinds.items()))


@lru_cache(maxsize=None)
def runtime_narrow_bits() -> frozenset[int]:
    """The narrow widths (of 2 and 4) whose Q/DQ the installed onnxruntime runs on CPU.

    Probed with a tiny graph per width: per-tensor Quantize/Dequantize of an activation and a
    per-axis DequantizeLinear of a weight, signed and unsigned, checked against numpy.
    """
    supported = set()
    for bits, opset in NARROW_OPSET.items():
        try:
            ok = all(_probe(bits, signed, opset) for signed in (False, True))
        except Exception:  # noqa: BLE001 - any failure means "not supported"
            ok = False
        if ok:
            supported.add(bits)
    return frozenset(supported)


def _probe(bits: int, signed: bool, opset: int) -> bool:
    import onnxruntime as ort

    dtype, (lo, hi) = NARROW_TYPES[bits, signed], integer_range(bits, signed)
    q = np.arange(lo, hi + 1).reshape(1, -1).repeat(2, 0)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wy"], axis=0)]
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "s"),
             helper.make_tensor("z", dtype, (), [lo + 1]),
             helper.make_tensor("w", dtype, q.shape, q.flatten().tolist()),
             numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "ws"),
             helper.make_tensor("wz", dtype, (2,), [lo, hi])]
    graph = helper.make_graph(
        nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "wy")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([-100.0, -0.2, 0.6, 100.0], np.float32)
    y, wy = session.run(None, {"x": x})
    want_y = (np.clip(np.round(x / 0.5) + lo + 1, lo, hi) - lo - 1) * 0.5
    want_wy = (q - np.array([[lo], [hi]])) * np.array([[1.0], [2.0]])
    return np.array_equal(y, want_y) and np.array_equal(wy, want_wy)


def _narrow_bits(storage: str) -> frozenset[int]:
    if storage not in STORAGE_CHOICES:
        raise ConfigError(f"storage must be one of {', '.join(STORAGE_CHOICES)}, got {storage!r}")
    if storage == "int8":
        return frozenset()
    return frozenset(NARROW_OPSET) if storage == "narrow" else runtime_narrow_bits()


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """Make initializers constants again (not graph inputs).

    The export keeps them as inputs only to stop torch from merging equal-valued ones (two
    layers' zero points of 0, say) into one, which would lose the per-layer names and types.
    """
    names = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def _retype(model: onnx.ModelProto, narrow: dict[str, tuple[int, bool]]) -> None:
    """Rewrite the named 8-bit initializers as INT2/UINT2/INT4/UINT4 tensors (same values)."""
    for init in model.graph.initializer:
        if init.name in narrow:
            values = numpy_helper.to_array(init)
            init.CopyFrom(helper.make_tensor(init.name, NARROW_TYPES[narrow[init.name]],
                                             values.shape, values.flatten().tolist()))
    # Types recorded by the exporter for intermediate values still say (u)int8.
    del model.graph.value_info[:]


def export_onnx(model: nn.Module, path: str | Path, example_input: Tensor,
                storage: str = "auto", metadata: dict[str, str] | None = None) -> OnnxExport:
    """Write `model` (quantized, calibrated) as ONNX with QDQ nodes and integer weights.

    `storage`: "narrow" stores 2/4-bit weights and activations in INT2/UINT2/INT4/UINT4
    (opset 25/21), "int8" in int8/uint8 (opset 20), "auto" picks narrow types per width where
    the installed onnxruntime runs them. The batch dimension of the input is dynamic.

    Args:
        model: a quantized, calibrated model (`quantize_model` + `calibrate`).
        path: the .onnx file to write.
        example_input: one input batch (normalized, as the model takes it) to trace with.
        storage: "auto", "narrow" or "int8" (see above).
        metadata: strings for the file's metadata_props (flatq records the run's weights).

    Returns:
        An OnnxExport: the path, opset, quantized layers and how each tensor is stored.

    Raises:
        ConfigError: a float model, an unknown `storage`, or quantized layers or quantizers
            with no integer form (attention's fused in-projection, DoReFa weights, LSQ+
            with a continuous offset).
    """
    layers = quant_layers(model)
    if not layers:
        raise ConfigError("export_onnx needs a quantized model (flatq.quantize_model)")
    check_exportable(layers)
    narrow_bits = _narrow_bits(storage)
    export_model = copy.deepcopy(model).cpu().eval()
    narrow: dict[str, tuple[int, bool]] = {}
    stored = []
    for name, layer in quant_layers(export_model):
        stand_in = _ExportLayer(name, layer, narrow_bits)
        export_model.set_submodule(name, stand_in)
        narrow.update(stand_in.narrow)
        stored.append(stand_in.storage)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(export_model, (example_input.cpu(),), buffer, dynamo=False,
                          opset_version=EXPORTER_OPSET, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"},
                                                                 "logits": {0: "batch"}},
                          keep_initializers_as_inputs=True)
    proto = onnx.load_from_string(buffer.getvalue())
    _drop_initializer_inputs(proto)
    missing = set(narrow) - {init.name for init in proto.graph.initializer}
    if missing:
        raise RuntimeError(f"exported graph lacks the initializers {sorted(missing)}")
    opset = max([EXPORTER_OPSET] + [NARROW_OPSET[bits] for bits, _ in narrow.values()])
    if opset != EXPORTER_OPSET:
        proto = version_converter.convert_version(proto, opset)
        _retype(proto, narrow)
    helper.set_model_props(proto, dict(metadata or {}))
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    try:
        onnx.save(proto, path)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    return OnnxExport(path, opset, stored)
