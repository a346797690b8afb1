"""Rewrites of an exported ONNX graph that keep its values and let onnxruntime fuse more.

`clips_after_quantize`: an activation between a Conv and the QuantizeLinear that reads it
(Relu, Clip: ReLU6) blocks onnxruntime's QLinearConv fusion unless the quantized range lies
inside the activation's range. QuantizeLinear is monotone, so Q(clip(x, a, b)) =
clip(Q(x), Q(a), Q(b)) exactly: the activation moves behind the QuantizeLinear as a Clip on
the integers (or vanishes when Q(a), Q(b) span the whole integer type).

`integers_through_relu_and_pool`: onnxruntime fuses an op into its integer form (QLinearAdd,
QLinearGlobalAveragePool) only when DequantizeLinear feeds it and QuantizeLinear reads it.
Two exact moves put them there. A ReLU or MaxPool after a per-tensor DequantizeLinear(s, z)
runs on the integers instead, DequantizeLinear after it: relu(s (q - z)) = s (max(q, z) - z),
a Clip from z (none when z is the type's minimum), and max commutes with the increasing map
q -> s (q - z). A Flatten/Reshape before a QuantizeLinear swaps with it (Q is elementwise and
per tensor).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

ACTIVATIONS = ("Relu", "Clip")
RESHAPES = ("Flatten", "Reshape")


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


def _per_tensor(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> bool:
    """A Quantize/DequantizeLinear with one constant scale and zero point."""
    return (len(node.input) == 3 and node.input[1] in constants and node.input[2] in constants
            and constants[node.input[1]].size == 1)


def integers_through_relu_and_pool(model: onnx.ModelProto) -> int:
    """Move per-tensor DequantizeLinear behind the Relu / MaxPool nodes it feeds and
    QuantizeLinear in front of the Flatten / Reshape nodes that feed it alone (in place);
    returns how many nodes moved."""
    graph, constants = model.graph, _constants(model)
    nodes, moved = list(graph.node), 0
    producer = {out: node for node in nodes for out in node.output}
    for op in [n for n in nodes if n.op_type in ("Relu", "MaxPool")]:
        dq = producer.get(op.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or not _per_tensor(dq, constants) \
                or len(op.output) != 1:
            continue
        integer = f"{op.output[0]}_integer"
        zero_point = constants[dq.input[2]]
        if op.op_type == "Relu" and zero_point.item() == np.iinfo(zero_point.dtype).min:
            # max(q, z) = q: the ReLU vanishes (a point after a ReLU, OutputPoint.relu_first)
            after = helper.make_node("DequantizeLinear", list(dq.input), list(op.output))
            nodes[nodes.index(op)] = after
            producer[op.output[0]] = after
            moved += 1
            continue
        if op.op_type == "Relu":  # max(q, z): a Clip from the zero point
            bounds = [f"{integer}_lo", f"{integer}_hi"]
            graph.initializer.extend(numpy_helper.from_array(
                np.array(v, zero_point.dtype), n)
                for v, n in zip((zero_point.item(), np.iinfo(zero_point.dtype).max), bounds))
            on_integers = helper.make_node("Clip", [dq.input[0]] + bounds, [integer])
        else:
            on_integers = helper.make_node("MaxPool", [dq.input[0]], [integer])
            on_integers.attribute.extend(op.attribute)
        after = helper.make_node("DequantizeLinear", [integer, *dq.input[1:]], list(op.output))
        at = nodes.index(op)
        nodes[at:at + 1] = [on_integers, after]
        producer[op.output[0]] = after
        moved += 1
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    for quant in [n for n in nodes if n.op_type == "QuantizeLinear"]:
        shape = producer.get(quant.input[0])
        if (shape is None or shape.op_type not in RESHAPES or not _per_tensor(quant, constants)
                or len(readers[shape.output[0]]) != 1 or shape.output[0] in outputs):
            continue
        # x -> shape -> Q -> out  becomes  x -> Q -> shape -> out
        source, out = shape.input[0], quant.output[0]
        quant.input[0], quant.output[0] = source, shape.output[0]
        shape.input[0], shape.output[0] = shape.output[0], out
        nodes.remove(quant)
        nodes.insert(nodes.index(shape), quant)
        moved += 1
    _drop_unread(graph, nodes)
    return moved


def merge_clips(model: onnx.ModelProto) -> int:
    """Merge each Clip whose input is another Clip's, read by it alone, into one (in place):
    clip(clip(q, a, b), c, d) = clip(q, max(a, c), min(b, d)) when that range is not empty
    (ReLU6 moved onto the integers, then a 4-bit grid's Clip). Returns how many merged."""
    graph, constants = model.graph, _constants(model)
    nodes, merged = list(graph.node), 0
    producer = {out: node for node in nodes for out in node.output}
    readers: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    for second in [n for n in nodes if n.op_type == "Clip"]:
        first = producer.get(second.input[0])
        if (first is None or first.op_type != "Clip" or readers[first.output[0]] != 1
                or first.output[0] in outputs
                or any(len(n.input) != 3 or not set(n.input[1:]) <= set(constants)
                       for n in (first, second))):
            continue
        lo = max(constants[first.input[1]], constants[second.input[1]])
        hi = min(constants[first.input[2]], constants[second.input[2]])
        if lo > hi:
            continue
        names = [f"{second.output[0]}_lo", f"{second.output[0]}_hi"]
        graph.initializer.extend(numpy_helper.from_array(np.array(v), n)
                                 for v, n in zip((lo, hi), names))
        second.input[:] = [first.input[0], *names]
        constants.update(zip(names, (lo, hi)))
        nodes.remove(first)
        merged += 1
    _drop_unread(graph, nodes)
    return merged


def _drop_unread(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Replace the graph's nodes by `nodes`, less the constants and DequantizeLinear nodes
    nothing reads any more."""
    read = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    kept = [n for n in nodes
            if n.op_type not in ("Constant", "DequantizeLinear") or n.output[0] in read]
    del graph.node[:]
    graph.node.extend(kept)
    inits = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(inits)
