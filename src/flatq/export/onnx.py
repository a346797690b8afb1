"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ) nodes and integer weights.

A model quantized for the onnxruntime target is written as the integer graph of
flatq.export.deploy (BatchNorm folded, int32 biases, output points), which onnxruntime fuses
into QLinearConv / QGemm / MatMulIntegerToFloat. A paper-target model is written as trained:
each quantized layer becomes

    input -> QuantizeLinear(s_x, z_x) [-> Clip(lo, hi)] -> DequantizeLinear(s_x, z_x) --+
    weight_q (integers) -> DequantizeLinear(s_w, z_w, axis=0) ----------> Conv/Gemm/MatMul (+ bias)

and everything else (BatchNorm, residual adds, attention) stays float. The graph comes from
torch's TorchScript exporter: the quantized layers are swapped for stand-ins whose autograd
Functions carry an ONNX `symbolic`, with the integers, scales and zero points as named buffers
(hence named initializers). The exporter knows only 8-bit integer types (opset <= 20); 2- and
4-bit tensors are then retyped to INT2/UINT2 (opset 25) or INT4/UINT4 (opset 21), packed, or
stay int8/uint8 holding only values of their bit width, a Clip on the quantized input keeping
activations on the narrow grid (QuantizeLinear alone saturates only to the 8-bit range). Every
file is run in onnxruntime against the PyTorch model before it replaces the target path.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper, version_converter
from torch import Tensor, nn

from ..atomic import replace_atomically, write_error
from ..errors import ConfigError
from ..quant import Quantizer, integer_range, quant_layers
from ..quant.target import has_output_points
from .check import ExportCheck, ExportError, check_agreement
from .deploy import DeployLayer, clip_needed, deploy_stand_ins
from .graph import clips_after_quantize, integers_through_relu_and_pool, merge_clips
from .integer_view import check_exportable, input_grid, integer_weight
from .onnx_ops import DequantizeAxis0, QuantDequant
from .packed import pack_bits

STORAGE_CHOICES = ("auto", "narrow", "int8")
EXPORTER_OPSET = 20  # the newest opset of torch's TorchScript exporter
NARROW_OPSET = {4: 21, 2: 25}  # first opset with (U)INT4 / (U)INT2 in QuantizeLinear
NARROW_TYPES = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
                (2, True): TensorProto.INT2, (2, False): TensorProto.UINT2}


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

    def __init__(self, name: str, layer: nn.Module, w_narrow_bits: frozenset[int],
                 a_narrow_bits: frozenset[int]) -> None:
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
        w_narrow = weight.bits in w_narrow_bits
        a_narrow = (grid.bits in a_narrow_bits
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
        x = QuantDequant.apply(x, self.input_scale, self.input_zero_point, self.lo, self.hi,
                                self.clip)
        y = self.op(x, DequantizeAxis0.apply(self.weight_q, self.weight_scale,
                                             self.weight_zero_point), None)
        if self.bias is None:
            return y
        # A separate Add: a float bias inside a Conv/Gemm with DQ inputs is re-quantized to
        # int32 by onnxruntime (its WeightBiasQuantization), which the model never did.
        linear = self.op is nn.functional.linear
        return y + self.bias.view((-1,) if linear else (-1,) + (1,) * (y.dim() - 2))


@dataclass
class OnnxExport:
    """What `export_onnx` wrote: the path, the opset and each quantized layer's storage."""

    path: Path
    opset: int
    layers: list[LayerStorage]
    file_bytes: int
    fp32_bytes: int  # `fp32_bytes(model)`: the full-precision model's state
    weight_bytes: int  # the quantized layers' weight integers in the file
    fp32_weight_bytes: int  # the same weights in float32
    check: ExportCheck | None  # None: written unchecked (verify=False)

    def size_summary(self) -> str:
        """One line: the file's size against FP32, in all and for the quantized weights."""
        return (f"{self.file_bytes:,} bytes vs {self.fp32_bytes:,} bytes in FP32 "
                f"({self.fp32_bytes / self.file_bytes:.1f}x smaller); quantized weights "
                f"{self.weight_bytes:,} vs {self.fp32_weight_bytes:,} bytes "
                f"({self.fp32_weight_bytes / max(self.weight_bytes, 1):.1f}x smaller)")

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


def _narrow_bits(storage: str) -> tuple[frozenset[int], frozenset[int]]:
    """(narrow weight widths, narrow input widths) of a storage choice.

    `auto` narrows weights only: onnxruntime's graph optimizations mishandle narrow activation
    types next to other nodes (Clip and MaxPool fusions, signed narrow inputs feeding a Conv),
    which a probe of Q/DQ alone does not reveal.
    """
    if storage not in STORAGE_CHOICES:
        raise ConfigError(f"storage must be one of {', '.join(STORAGE_CHOICES)}, got {storage!r}")
    if storage == "int8":
        return frozenset(), frozenset()
    if storage == "narrow":
        return frozenset(NARROW_OPSET), frozenset(NARROW_OPSET)
    return runtime_narrow_bits(), frozenset()


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """Make initializers constants again (not graph inputs).

    The export keeps them as inputs only to stop torch from merging equal-valued ones (two
    layers' zero points of 0, say) into one, which would lose the per-layer names and types.
    """
    names = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def narrow_tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> TensorProto:
    """An INT2/UINT2/INT4/UINT4 initializer holding `values`, bit-packed in raw_data."""
    return helper.make_tensor(name, NARROW_TYPES[bits, signed], values.shape,
                              pack_bits(values, bits).tobytes(), raw=True)


def _retype(model: onnx.ModelProto, narrow: dict[str, tuple[int, bool]]) -> None:
    """Rewrite the named 8-bit initializers as INT2/UINT2/INT4/UINT4 tensors (same values)."""
    for init in model.graph.initializer:
        if init.name in narrow:
            init.CopyFrom(narrow_tensor(init.name, numpy_helper.to_array(init),
                                        *narrow[init.name]))
    # Types recorded by the exporter for intermediate values still say (u)int8.
    del model.graph.value_info[:]


def _pack_behind_cast(model: onnx.ModelProto, names: set[str]) -> None:
    """Store the named int8 weights as packed INT4 and widen them back to int8 with a Cast.

    onnxruntime's integer conv/gemm kernels take 8-bit weights; it folds the Cast of a constant
    at load time, so the fused kernels see the same int8 weights while the file holds 4 bits
    a value.
    """
    casts = []
    for init in model.graph.initializer:
        if init.name in names:
            packed = f"{init.name}_int4"
            casts.append(helper.make_node("Cast", [packed], [init.name], to=TensorProto.INT8))
            init.CopyFrom(narrow_tensor(packed, numpy_helper.to_array(init), 4, True))
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]


def fp32_bytes(model: nn.Module) -> int:
    """4 bytes per floating-point element of the model's state, quantizers left out: the size
    of the full-precision model's weights."""
    skip = tuple(f"{name}." for name, module in model.named_modules(remove_duplicate=False)
                 if isinstance(module, Quantizer))  # a shared grid (quant.shared_grid): all names
    return 4 * sum(v.numel() for k, v in model.state_dict().items()
                   if isinstance(v, Tensor) and v.is_floating_point()
                   and not k.startswith(skip))


def _paper_stand_ins(model: nn.Module, storage: str
                     ) -> tuple[dict[str, nn.Module], list[LayerStorage], dict, set[str]]:
    w_bits, a_bits = _narrow_bits(storage)
    replaced, stored, narrow = {}, [], {}
    for name, layer in quant_layers(model):
        stand_in = _ExportLayer(name, layer, w_bits, a_bits)
        replaced[name] = stand_in
        narrow.update(stand_in.narrow)
        stored.append(stand_in.storage)
    return replaced, stored, narrow, set()


def _deploy_stand_ins(model: nn.Module, storage: str
                      ) -> tuple[dict[str, nn.Module], list[LayerStorage], dict, set[str]]:
    _narrow_bits(storage)  # validates the name
    replaced = deploy_stand_ins(model, quant_layers(model))
    stored, packed = [], set()
    for name, stand_in in replaced.items():
        if not isinstance(stand_in, DeployLayer):
            continue
        pack = stand_in.bits <= 4 and storage != "int8"
        if pack:
            packed.add(f"{name}.weight_q")
        grid = stand_in.input_grid
        stored.append(LayerStorage(name, stand_in.bits, grid.bits,
                                   "int4 (Cast to int8)" if pack else "int8",
                                   "int8" if grid.lo < 0 else "uint8",
                                   clip_needed(grid.lo, grid.hi, grid.signed)))
    return replaced, stored, {}, packed


def export_onnx(model: nn.Module, path: str | Path, example_input: Tensor,
                storage: str = "auto", metadata: dict[str, str] | None = None,
                check_input: Tensor | None = None, verify: bool = True) -> OnnxExport:
    """Write `model` (quantized, calibrated) as ONNX with QDQ nodes and integer weights.

    A model quantized for the onnxruntime target (quant.target) is written as the integer graph
    of flatq.export.deploy (BatchNorm folded, int32 biases, output points): onnxruntime runs
    every quantized layer as QLinearConv / QGemm / MatMulIntegerToFloat; its 2- to 4-bit
    weights are stored as packed INT4 (`storage` int8: int8). Otherwise (paper target) the
    graph keeps BatchNorm as trained, and `storage` says how 2/4-bit tensors are typed:
    "narrow" INT2/UINT2/INT4/UINT4 (opset 25/21), "int8" int8/uint8 (opset 20), "auto" narrow
    weights where the installed onnxruntime runs them. The batch dimension is dynamic.

    Args:
        model: a quantized, calibrated model (`quantize_model` + `calibrate`).
        path: the .onnx file to write.
        example_input: one input batch (normalized, as the model takes it) to trace with.
        storage: "auto", "narrow" or "int8" (see above).
        metadata: strings for the file's metadata_props (flatq records the run's weights).
        check_input: the images of the export's own check (default `example_input`): before
            the file replaces `path`, onnxruntime (default optimizations) runs them against
            the PyTorch model (`check_agreement`).
        verify: False skips that check, for speed measurements of untrained networks whose
            near-tie roundings can spread past it (bench/deploy.py reports agreement itself).

    Returns:
        An OnnxExport: the path, opset, quantized layers, how each tensor is stored, the
        sizes and the check.

    Raises:
        ConfigError: a float model, an unknown `storage`, or quantized layers or quantizers
            with no integer form (attention's fused in-projection, DoReFa weights, LSQ+
            with a continuous offset).
        ExportError: the check found the graph computing something else; nothing written.
    """
    layers = quant_layers(model)
    if not layers:
        raise ConfigError("export_onnx needs a quantized model (flatq.quantize_model)")
    check_exportable(layers)
    export_model = copy.deepcopy(model).cpu().eval()
    make = _deploy_stand_ins if has_output_points(export_model) else _paper_stand_ins
    replaced, stored, narrow, packed = make(export_model, storage)
    for name, stand_in in replaced.items():
        export_model.set_submodule(name, stand_in)
    proto = _trace(export_model, example_input)
    names = {init.name for init in proto.graph.initializer}
    missing = (set(narrow) | packed) - names
    if missing:
        raise RuntimeError(f"exported graph lacks the initializers {sorted(missing)}")
    opset = max([EXPORTER_OPSET] + [NARROW_OPSET[bits] for bits, _ in narrow.values()]
                + [NARROW_OPSET[4]] * bool(packed))
    if opset != EXPORTER_OPSET:
        proto = version_converter.convert_version(proto, opset)
        _retype(proto, narrow)
        _pack_behind_cast(proto, packed)
    if make is _deploy_stand_ins:
        clips_after_quantize(proto)
        integers_through_relu_and_pool(proto)
        merge_clips(proto)
    helper.set_model_props(proto, dict(metadata or {}))
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    try:
        agreement = check_agreement(data, model, example_input if check_input is None
                                    else check_input) if verify else None
    except ExportError as exc:
        if storage != "narrow" or make is _deploy_stand_ins:
            raise
        raise ExportError(f"{exc}; storage 'narrow' types activations INT2/INT4, which "
                          "onnxruntime's graph optimizations do not all handle: use 'auto' "
                          "(narrow weights only) or 'int8'") from None
    path = Path(path)
    try:
        replace_atomically(path, lambda handle: handle.write(data))
    except OSError as exc:
        raise write_error(path, exc) from None
    weights = {f"{name}.weight_q{suffix}" for name, _ in layers for suffix in ("", "_int4")}
    weight_bytes = sum(len(init.raw_data) or numpy_helper.to_array(init).nbytes
                       for init in proto.graph.initializer if init.name in weights)
    return OnnxExport(path, opset, stored, len(data), fp32_bytes(model), weight_bytes,
                      4 * sum(layer.weight.numel() for _, layer in layers), agreement)


def export_float_onnx(model: nn.Module, path: str | Path, example_input: Tensor) -> int:
    """Write a full-precision model as ONNX (eval mode; torch folds BatchNorm into the convs),
    the baseline of a deployed quantized model. Returns the file's size in bytes."""
    model = copy.deepcopy(model).cpu().eval()
    data = _trace(model, example_input).SerializeToString()
    path = Path(path)
    try:
        replace_atomically(path, lambda handle: handle.write(data))
    except OSError as exc:
        raise write_error(path, exc) from None
    return len(data)


def _trace(model: nn.Module, example_input: Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(model, (example_input.cpu(),), buffer, dynamo=False,
                          opset_version=EXPORTER_OPSET, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"},
                                                                 "logits": {0: "batch"}},
                          keep_initializers_as_inputs=True)
    proto = onnx.load_from_string(buffer.getvalue())
    _drop_initializer_inputs(proto)
    return proto
