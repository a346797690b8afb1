"""Rewrites of an exported ONNX graph that keep its values and let onnxruntime fuse more.

`clips_after_quantize`: an activation between a Conv and the QuantizeLinear that reads it
(Relu, Clip: ReLU6) blocks onnxruntime's QLinearConv fusion unless the quantized range lies
inside the activation's range. QuantizeLinear is monotone, so Q(clip(x, a, b)) =
clip(Q(x), Q(a), Q(b)) exactly: the activation moves behind the QuantizeLinear as a Clip on
the integers (or vanishes when Q(a), Q(b) span the whole integer type).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

ACTIVATIONS = ("Relu", "Clip")


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _quantized(bound: float, scale: np.ndarray, zero_point: np.ndarray) -> int:
    """QuantizeLinear of one value, before saturation (round half to even, as ONNX)."""
    if np.isinf(bound):
        return int(np.sign(bound)) * 2**31
    return int(np.rint(np.float32(bound) / np.float32(scale))) + int(zero_point)


def clips_after_quantize(model: onnx.ModelProto) -> int:
    """Move every Relu/Clip whose only reader is a QuantizeLinear behind it (in place); returns
    how many moved."""
    graph, constants = model.graph, _constants(model)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    nodes, moved = list(graph.node), 0
    for act in [n for n in nodes if n.op_type in ACTIVATIONS]:
        after = readers.get(act.output[0], [])
        if len(after) != 1 or after[0].op_type != "QuantizeLinear" or act.output[0] in outputs:
            continue
        quant = after[0]
        if len(quant.input) < 3 or not {quant.input[1], quant.input[2]} <= set(constants):
            continue
        bounds = [0.0, np.inf] if act.op_type == "Relu" else [
            float(constants[name]) if name else inf
            for name, inf in zip(list(act.input[1:3]) + [""] * 2, (-np.inf, np.inf))]
        if act.op_type == "Clip" and any(n and n not in constants for n in act.input[1:3]):
            continue
        zero_point = constants[quant.input[2]]
        info = np.iinfo(zero_point.dtype)
        lo, hi = (max(info.min, _quantized(b, constants[quant.input[1]], zero_point))
                  if i == 0 else min(info.max, _quantized(b, constants[quant.input[1]],
                                                          zero_point))
                  for i, b in enumerate(bounds))
        quant.input[0] = act.input[0]
        nodes.remove(act)
        moved += 1
        if (lo, hi) == (info.min, info.max):
            continue
        raw = f"{quant.output[0]}_unclipped"
        names = [f"{raw}_lo", f"{raw}_hi"]
        graph.initializer.extend(numpy_helper.from_array(np.array(v, zero_point.dtype), n)
                                 for v, n in zip((lo, hi), names))
        clip = helper.make_node("Clip", [raw] + names, [quant.output[0]])
        quant.output[0] = raw
        nodes.insert(nodes.index(quant) + 1, clip)
    _drop_unread(graph, nodes)
    return moved


def _drop_unread(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Replace the graph's nodes by `nodes`, less the constants nothing reads any more."""
    read = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    kept = [n for n in nodes if n.op_type != "Constant" or n.output[0] in read]
    del graph.node[:]
    graph.node.extend(kept)
    inits = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(inits)
