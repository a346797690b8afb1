"""The integer file: packed low-bit weights, scales, zero points and shapes in one .npz.

Layout (docs/export.md has the full description). One uncompressed numpy .npz holding
  `__manifest__`   UTF-8 JSON as uint8 bytes: format, version, model metadata, per quantized
                   layer its name, kind, weight shape, bit width, signedness, the weight
                   integers' range [lo, hi] and input grid,
                   per active output point (version 2; onnxruntime target) its name, where it
                   sits, grid, `relu_first` and the layers sharing its grid, and a table of
                   named tensors: name -> dtype, offset and shape in a blob;
  one blob per dtype (`uint8`, `float32`, `int16`, `int64`): the tensors of that dtype
                   flattened and concatenated, so the file has a handful of arrays instead of
                   hundreds of .npz members with a few hundred bytes of headers each.
Named tensors: `<layer>.weight_q` (the weight integers as a bit stream, see `pack_bits`),
`<layer>.weight_scale` float32 (C,), `<layer>.weight_zero_point` int16 (C,),
`<layer>.input_scale` float32 (), `<point>.scale` float32 () per active output point, and
every other tensor of the model (biases, BatchNorm, embeddings) under its state_dict name.
Plain numpy: no new dependency.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..quant import Quantizer, integer_range, quant_layers
from ..quant.layers import OutputPoint
from ..quant.shared_grid import GRID_KEY, tie
from .integer_view import (GridQuantizer, InputGrid, IntegerWeight, OutputPointGrid,
                           check_exportable, input_grid, integer_weight, output_point_grids)

# Version 2 added the output points; version-1 files (none) still load.
FORMAT, VERSION, READABLE_VERSIONS = "flatq-int", 2, (1, 2)
MANIFEST = "__manifest__"


class _Blobs:
    """Arrays stored as slices of one flat array per dtype, located by a table of entries."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}
        self.table: dict[str, dict[str, Any]] = {}

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.asarray(array)
        parts = self.parts.setdefault(array.dtype.name, [])
        self.table[name] = {"dtype": array.dtype.name, "shape": list(array.shape),
                            "offset": sum(p.size for p in parts)}
        parts.append(array.reshape(-1))

    def arrays(self) -> dict[str, np.ndarray]:
        return {dtype: np.concatenate(parts) for dtype, parts in self.parts.items()}


def _blob_reader(arrays: dict[str, np.ndarray], table: dict[str, dict[str, Any]]):
    """name -> the array `_Blobs.add` stored under it."""
    def read(name: str) -> np.ndarray:
        entry = table[name]
        size, start = int(np.prod(entry["shape"])), entry["offset"]
        flat = arrays[entry["dtype"]][start:start + size]
        if flat.size != size:
            raise ValueError(f"tensor {name} runs past the end of the {entry['dtype']} blob")
        return flat.reshape(entry["shape"])
    return read


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Integers (each fitting `bits` bits, two's complement when negative) as a bit stream.

    Element i occupies bits [i*bits, (i+1)*bits) of the stream, least significant bit first,
    and stream bit k is bit (k mod 8) of byte k // 8: so 4-bit values pack two per byte, the
    first in the low nibble (as ONNX INT4), 2-bit values four per byte, 8-bit one per byte.
    """
    codes = np.asarray(q).astype(np.int64).reshape(-1) & ((1 << bits) - 1)
    planes = (codes[:, None] >> np.arange(bits)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int, signed: bool) -> np.ndarray:
    """Inverse of `pack_bits`: `count` integers (int64), sign-extended when `signed`."""
    planes = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    codes = (planes.astype(np.int64) << np.arange(bits)).sum(axis=1)
    if signed:
        codes -= (codes >> (bits - 1)) << bits
    return codes


@dataclass(frozen=True)
class IntegerLayer:
    """One quantized layer as stored: its weight integers and its input quantizer's grid."""

    name: str
    kind: str  # "conv1d", "conv2d" or "linear"
    weight: IntegerWeight
    input: InputGrid


@dataclass
class IntegerModel:
    """A loaded integer file: quantized layers, the other tensors, the model metadata and the
    active output points (by module name; none for the paper target or a version-1 file)."""

    layers: dict[str, IntegerLayer]
    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    output_points: dict[str, OutputPointGrid] = field(default_factory=dict)
    version: int = VERSION

    def state_dict(self) -> dict[str, Tensor]:
        """A full-precision state_dict with every quantized weight dequantized ((q - z) * s)."""
        weights = {f"{name}.weight": layer.weight.dequantize() for name, layer in self.layers.items()}
        return {**self.tensors, **weights}

    def float_model(self) -> nn.Module:
        """The float architecture (from the metadata) holding the dequantized weights."""
        from ..models import build_model

        if "model" not in self.meta:
            raise CheckpointError("the integer file records no model name; build the model "
                                  "yourself and load state_dict()")
        model = build_model(self.meta["model"], num_classes=self.meta["num_classes"],
                            in_channels=self.meta["in_channels"])
        model.load_state_dict(self.state_dict())
        return model.eval()

    def quantized_model(self) -> nn.Module:
        """The quantized model the file was written from, computing what it computed: built
        from the metadata (model and QuantConfig) with the dequantized weights and the other
        tensors, every quantizer a `GridQuantizer` on the stored grid, the stored output points
        active (the others off) and their grids shared as stored. In eval mode.

        Raises:
            CheckpointError: the metadata lacks the model or its QuantConfig, the file does not
                fit the model they describe, or it is a version-1 file of a model with output
                points (not recorded then).
        """
        from ..train.run_io import build_from_meta

        if self.meta.get("quant") is None:
            raise CheckpointError("the integer file records no QuantConfig (meta 'quant'); "
                                  "only float_model() can be rebuilt from it")
        model = build_from_meta(self.meta)
        self._check_fits(model)
        try:
            model.load_state_dict({**model.state_dict(), **self.state_dict()})
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())
            raise CheckpointError(f"the integer file's tensors do not fit model "
                                  f"{self.meta['model']}: {detail[:400]}") from None
        self._install_grids(model)
        return model.eval()

    def _check_fits(self, model: nn.Module) -> None:
        """Refuse a file whose layers, tensors or output points are not `model`'s."""
        names = [name for name, _ in quant_layers(model)]
        points = {n for n, m in model.named_modules() if isinstance(m, OutputPoint)}
        if points and self.version == 1:
            raise CheckpointError(f"a version-1 integer file records no output points, and "
                                  f"model {self.meta['model']} has {len(points)}: export the "
                                  "run again")
        problems = {
            "quantized layers": set(names) ^ set(self.layers),
            "tensors": ((set(self.tensors) | {f"{n}.weight" for n in self.layers})
                        ^ ({f"{n}.weight" for n in names} | set(_other_keys(model, names)))),
            "output points": set(self.output_points) - points,
            "layers sharing a point's grid": {n for p in self.output_points.values()
                                              for n in p.shared_by} - set(names)}
        problems = {what: sorted(keys) for what, keys in problems.items() if keys}
        if problems:
            detail = "; ".join(f"{what} {keys[:5]}" for what, keys in problems.items())
            raise CheckpointError(f"the integer file does not fit model {self.meta['model']} "
                                  f"built from its metadata (differing {detail})")

    def _install_grids(self, model: nn.Module) -> None:
        """Put the stored grids into `model`'s quantizers and output points (in place)."""
        layers = dict(quant_layers(model))
        for name, layer in layers.items():
            layer.weight_quantizer = GridQuantizer.for_weight(self.layers[name].weight)
            layer.input_quantizer = GridQuantizer.for_input(self.layers[name].input)
        points = [(n, m) for n, m in model.named_modules() if isinstance(m, OutputPoint)]
        for index, (name, point) in enumerate(points):
            stored = self.output_points.get(name)
            point.set_active(stored is not None)
            if stored is None:
                continue
            if stored.shared_by:  # the readers' input quantizer is the point's
                tie(point, index, [layers[n] for n in stored.shared_by], stored.relu_first)
            else:
                point.quantizer = GridQuantizer.for_input(stored.grid)
                point.set_relu_first(stored.relu_first)


@dataclass(frozen=True)
class IntegerExport:
    """Sizes of a written integer file against the same model in float32."""

    path: Path
    layers: int
    file_bytes: int  # the .npz on disk
    data_bytes: int  # its arrays without the manifest and the .npz headers
    fp32_bytes: int  # 4 bytes per floating-point element of the model's state

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.file_bytes


def _other_keys(model: nn.Module, layer_names: list[str]) -> list[str]:
    """State entries outside the quantizers, output points, grid ties and quantized weights
    (biases, BN, ...)."""
    skip = tuple(f"{name}." for name, module in model.named_modules(remove_duplicate=False)
                 if isinstance(module, (Quantizer, OutputPoint)))  # a shared grid: every name
    weights = {f"{name}.weight" for name in layer_names}
    return [k for k in model.state_dict()
            if not k.startswith(skip) and k not in weights and not k.endswith(f".{GRID_KEY}")]


def _grid_entry(grid: InputGrid) -> dict[str, Any]:
    """A grid in the manifest: all but its step size, which is a float32 tensor."""
    return {"bits": grid.bits, "signed": grid.signed, "zero_point": grid.zero_point,
            "lo": grid.lo, "hi": grid.hi}


def _point_entry(point: OutputPointGrid) -> dict[str, Any]:
    """An output point in the manifest (its step size: the tensor `<name>.scale`)."""
    return {"name": point.name, "site": point.site, "after": point.after,
            "layer": point.layer, "grid": _grid_entry(point.grid),
            "relu_first": point.relu_first, "shared_by": list(point.shared_by)}


def export_integer(model: nn.Module, path: str | Path,
                   meta: dict[str, Any] | None = None) -> IntegerExport:
    """Write the quantized `model` as an integer file (.npz) of bit-packed weights with their
    scales and zero points, each layer's input grid and each active output point's grid.

    Args:
        model: a quantized, calibrated model.
        path: the .npz file to write.
        meta: model name, classes and channels (and the QuantConfig as a dict under
            "quant"), so that `IntegerModel.float_model` (`.quantized_model`) can rebuild the
            model.

    Returns:
        An IntegerExport: the path, layer count and sizes against FP32.

    Raises:
        ConfigError: a float model, or quantized layers or quantizers with no integer form.
    """
    layers = quant_layers(model)
    if not layers:
        raise ConfigError("export_integer needs a quantized model (flatq.quantize_model)")
    check_exportable(layers)
    blobs, entries, fp32_elements = _Blobs(), [], 0
    for name, layer in layers:
        weight, grid = integer_weight(layer), input_grid(layer)
        blobs.add(f"{name}.weight_q", pack_bits(weight.q.cpu().numpy(), weight.bits))
        blobs.add(f"{name}.weight_scale", weight.scale.cpu().numpy().astype(np.float32))
        blobs.add(f"{name}.weight_zero_point", weight.zero_point.cpu().numpy().astype(np.int16))
        blobs.add(f"{name}.input_scale", np.array(grid.scale, dtype=np.float32))
        fp32_elements += weight.q.numel()
        entries.append({
            "name": name, "kind": layer.kind,
            "shape": list(weight.q.shape), "bits": weight.bits, "signed": weight.signed,
            "weight_range": [weight.lo, weight.hi], "input": _grid_entry(grid)})
    points = output_point_grids(model)
    for point in points:
        blobs.add(f"{point.name}.scale", np.array(point.grid.scale, dtype=np.float32))
    state = model.state_dict()
    tensors = _other_keys(model, [name for name, _ in layers])
    for key in tensors:
        value = state[key].detach().cpu()
        blobs.add(key, value.numpy())
        fp32_elements += value.numel() if value.is_floating_point() else 0
    manifest = {"format": FORMAT, "version": VERSION, "meta": meta or {}, "layers": entries,
                # absent, as in version 1, where no output point is active (paper target)
                **({"output_points": [_point_entry(p) for p in points]} if points else {}),
                "tensors": tensors, "table": blobs.table}
    text = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    arrays = blobs.arrays()
    path = Path(path)
    try:
        with path.open("wb") as f:
            np.savez(f, **{MANIFEST: text}, **arrays)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    return IntegerExport(path, len(layers), path.stat().st_size,
                         sum(a.nbytes for a in arrays.values()), 4 * fp32_elements)


def load_integer(path: str | Path) -> IntegerModel:
    """Read an integer file written by `export_integer`, unpacking the weights.

    Raises:
        CheckpointError: no such file, or not an integer file flatq wrote.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not an integer file written by flatq export ({exc})") from None
    try:
        manifest = json.loads(arrays.pop(MANIFEST).tobytes().decode())
        version = manifest.get("version")
        if manifest.get("format") != FORMAT or version not in READABLE_VERSIONS:
            raise ValueError(f"format {manifest.get('format')} version {version}")
        read = _blob_reader(arrays, manifest["table"])
        layers = {entry["name"]: _read_layer(entry, read) for entry in manifest["layers"]}
        points = {entry["name"]: _read_point(entry, read)
                  for entry in manifest.get("output_points", [])}
        tensors = {key: torch.from_numpy(read(key).copy()) for key in manifest["tensors"]}
    except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
        versions = " or ".join(f"v{v}" for v in READABLE_VERSIONS)
        raise CheckpointError(f"{path}: not a {FORMAT} {versions} file ({exc})") from None
    return IntegerModel(layers, tensors, manifest["meta"], points, version)


def _read_layer(entry: dict[str, Any], read) -> IntegerLayer:
    name, shape = entry["name"], tuple(entry["shape"])
    bits, signed = entry["bits"], entry["signed"]
    q = unpack_bits(read(f"{name}.weight_q"), bits, int(np.prod(shape)), signed)
    # files written before `weight_range` existed: the whole grid, which holds any integers
    lo, hi = entry.get("weight_range", integer_range(bits, signed))
    weight = IntegerWeight(torch.from_numpy(q.reshape(shape)).float(),
                           torch.from_numpy(read(f"{name}.weight_scale").copy()),
                           torch.from_numpy(read(f"{name}.weight_zero_point")).float(),
                           bits, signed, int(lo), int(hi))
    return IntegerLayer(name, entry["kind"], weight, _read_grid(entry["input"], read,
                                                              f"{name}.input_scale"))


def _read_point(entry: dict[str, Any], read) -> OutputPointGrid:
    name = entry["name"]
    return OutputPointGrid(name, entry["site"], entry["after"], entry["layer"],
                           _read_grid(entry["grid"], read, f"{name}.scale"),
                           bool(entry["relu_first"]), tuple(entry["shared_by"]))


def _read_grid(fields: dict[str, Any], read, scale_key: str) -> InputGrid:
    """The grid a manifest entry (`_grid_entry`) and its step-size tensor describe."""
    return InputGrid(float(read(scale_key)), **fields)
