"""Export: ONNX QDQ graphs run in onnxruntime against the fake-quant PyTorch model, and the
packed integer file against the quantizers' own output.

Tolerance of the ONNX comparisons: both sides quantize as round(x/s) + z in float32, but
onnxruntime sums convolutions in another order, so a sum near a half step can round the other
way. So now and then one activation lands on the neighbouring integer, and that one-step change
then moves the rest of that image's forward pass. We therefore ask that nearly every image
(>= 90%) matches to float32 precision (1e-5 of the logit scale), that predictions agree on
>= 95% of images, and (CNNs) that no logit is off by more than 5% of the logit scale.
"""

import collections
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from flatq import QuantConfig, calibrate, quantize_model
from flatq.cli import main
from flatq.config import DataConfig
from flatq.data import calibration_batches, pipeline_for
from flatq.errors import CheckpointError, ConfigError
from flatq.export import (OnnxModel, export_integer, export_onnx, input_grid, integer_weight,
                          load_integer, pack_bits, runtime_narrow_bits, unpack_bits)
from flatq.models import build_model
from flatq.models.vit import VisionTransformer
from flatq.quant import integer_range, quant_layers
from flatq.quant.layers import OutputPoint
from flatq.train.checkpoint import MODEL_NAME, save_atomic

NARROW = {TensorProto.INT2, TensorProto.UINT2, TensorProto.INT4, TensorProto.UINT4}
INTEGER_TYPES = NARROW | {TensorProto.INT8, TensorProto.UINT8}


def quantized(model: torch.nn.Module, bits: str = "w4a4", quantizer: str = "lsq",
              size: int = 32, seed: int = 0, **kw) -> torch.nn.Module:
    """`model` quantized and calibrated on random images (no training), in eval mode."""
    torch.manual_seed(seed)
    qmodel = quantize_model(model, QuantConfig(w_bits=int(bits[1]), a_bits=int(bits[3]),
                                               quantizer=quantizer, **kw))
    calibrate(qmodel, [torch.randn(32, 3, size, size)])
    return qmodel.eval()


def run_both(model, path, storage="auto", size=32, n=64):
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))
    written = export_onnx(model, path, x[:1], storage=storage)
    with torch.no_grad():
        reference = model(x).numpy()
    return written, OnnxModel(path)(x), reference


def assert_agrees(logits, reference, max_rel=5e-2):
    scale = np.abs(reference).max()
    per_image = np.abs(logits - reference).max(axis=1) / scale
    assert (per_image <= 1e-5).mean() >= 0.9, np.sort(per_image)[-8:]
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.95
    if max_rel is not None:
        assert per_image.max() <= max_rel, per_image.max()


def weight_initializers(proto):
    """name -> array of every initializer feeding a per-axis DequantizeLinear (the weights)."""
    inits = {i.name: i for i in proto.graph.initializer}
    return {node.input[0]: inits[node.input[0]] for node in proto.graph.node
            if node.op_type == "DequantizeLinear" and any(a.name == "axis" for a in node.attribute)}


# -- integer packing --------------------------------------------------------------------------
def test_pack_bits_layout_worked_by_hand():
    assert pack_bits(np.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack_bits(np.array([1, -1]), 4).tolist() == [0xF1]  # low nibble first, as ONNX INT4
    assert pack_bits(np.array([1, 2, 3]), 3).tolist() == [0b11010001, 0]
    assert pack_bits(np.array([200, 7]), 8).tolist() == [200, 7]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_pack_unpack_round_trip(bits, signed):
    lo, hi = integer_range(bits, signed)
    q = np.random.default_rng(bits).integers(lo, hi + 1, size=1001)
    packed = pack_bits(q, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-1001 * bits // 8)
    assert np.array_equal(unpack_bits(packed, bits, 1001, signed), q)


# -- the integer view of a layer --------------------------------------------------------------
@pytest.mark.parametrize("quantizer", ["lsq", "lsq+", "pact", "minmax"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_integer_weight_reproduces_fake_quant_exactly(quantizer, symmetric):
    model = quantized(build_model("resnet8"), "w3a3", quantizer, symmetric_weights=symmetric)
    for name, layer in quant_layers(model):
        weight = integer_weight(layer)
        qmin, qmax = integer_range(weight.bits, symmetric)
        assert torch.equal(weight.dequantize(), layer.quantized_weight()), name
        assert torch.equal(weight.q, weight.q.round()) and qmin <= weight.q.min() <= weight.q.max() <= qmax
        assert torch.equal(weight.zero_point, weight.zero_point.round())
        if symmetric:
            assert not weight.zero_point.any()


def test_input_grid_rounds_lsq_plus_offset_and_clips_signed_pact_symmetrically():
    model = quantized(build_model("resnet8"), "w4a4", "lsq+")
    layer = dict(quant_layers(model))["stages.0.0.residual.1.0"]
    quantizer = layer.input_quantizer
    with torch.no_grad():
        quantizer.offset.copy_(-3.4 * quantizer.scale)   # zero point -beta / s = 3.4
    assert input_grid(layer).zero_point == 3
    stem = quant_layers(quantized(build_model("resnet8"), "w4a4", "pact"))[0][1]
    grid = input_grid(stem)  # the first layer sees normalized images: signed PACT
    assert grid.signed and (grid.lo, grid.hi) == (-127, 127) and grid.zero_point == 0


# -- integer file -----------------------------------------------------------------------------
@pytest.mark.parametrize("bits,min_ratio", [("w2a2", 5.0), ("w3a5", 4.0)])
def test_integer_file_round_trips_exactly(tmp_path, bits, min_ratio):
    model = quantized(build_model("resnet8"), bits)
    meta = {"model": "resnet8", "num_classes": 10, "in_channels": 3}
    written = export_integer(model, tmp_path / "m.npz", meta=meta)
    loaded = load_integer(tmp_path / "m.npz")
    layers = quant_layers(model)
    assert written.layers == len(loaded.layers) == len(layers)
    for name, layer in layers:
        stored = loaded.layers[name]
        assert torch.equal(stored.weight.dequantize(), layer.weight_quantizer(layer.weight)), name
        assert (stored.weight.lo, stored.weight.hi) == layer.weight_quantizer.integer_grid()[2:]
        assert stored.input == input_grid(layer)
    packed = sum(-(-l.weight.numel() * l.bits[0] // 8) for _, l in layers)
    assert written.data_bytes < packed + written.fp32_bytes // 10  # weights really are packed
    assert written.file_bytes == (tmp_path / "m.npz").stat().st_size
    assert written.ratio >= min_ratio
    float_model = loaded.float_model()
    for name, layer in layers:
        assert torch.equal(float_model.get_submodule(name).weight, layer.quantized_weight())
        if layer.bias is not None:
            assert torch.equal(float_model.get_submodule(name).bias, layer.bias)


def test_load_integer_refuses_other_files(tmp_path):
    (tmp_path / "a.txt").write_text("not a zip")
    np.savez(tmp_path / "b.npz", x=np.zeros(3))
    for name in ("a.txt", "b.npz", "missing.npz"):
        with pytest.raises(CheckpointError, match=name):
            load_integer(tmp_path / name)


def resnet8_integer_file(tmp_path, **kw):
    """A calibrated W4A4 ResNet-8 (`kw`: more QuantConfig fields) and its integer file, whose
    metadata records the QuantConfig as `flatq export` does."""
    model = quantized(build_model("resnet8"), "w4a4", **kw)
    config = QuantConfig(w_bits=4, a_bits=4, quantizer="lsq", **kw)
    meta = {"model": "resnet8", "num_classes": 10, "in_channels": 3, "quant": config.to_dict()}
    return model, export_integer(model, tmp_path / "m.npz", meta=meta).path


def rewrite_manifest(path, change):
    """Apply `change` to the manifest of the integer file at `path` (in place)."""
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    manifest = json.loads(arrays["__manifest__"].tobytes().decode())
    change(manifest)
    arrays["__manifest__"] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def test_integer_file_lists_every_active_output_point_with_its_trained_grid(tmp_path):
    model, path = resnet8_integer_file(tmp_path, target="onnxruntime")
    loaded = load_integer(path)
    points = [(n, m) for n, m in model.named_modules() if isinstance(m, OutputPoint)]
    active = [(n, m) for n, m in points if bool(m.active)]
    assert 0 < len(active) < len(points) and loaded.version == 2
    assert set(loaded.output_points) == {name for name, _ in active}
    for index, (name, point) in enumerate(points):
        if not bool(point.active):
            continue
        stored, quantizer = loaded.output_points[name], point.quantizer
        assert model.get_submodule(stored.after).output_point is point
        assert stored.grid.scale == quantizer.scale.item()  # LSQ: the learned step size
        assert stored.grid.zero_point == quantizer.zero_point.item()
        assert (stored.grid.bits, stored.grid.signed) == (quantizer.bits, quantizer.signed)
        assert (stored.grid.lo, stored.grid.hi) == integer_range(quantizer.bits, quantizer.signed)
        assert stored.relu_first == bool(point.relu_first)
        assert stored.shared_by == tuple(n for n, layer in quant_layers(model)
                                         if int(layer.input_grid_point) == index)
        if stored.site == "batchnorm":
            assert model.get_submodule(stored.after).conv is model.get_submodule(stored.layer)
    sites = collections.Counter(p.site for p in loaded.output_points.values())
    assert sites == {"batchnorm": 6, "residual": 3}, sites


@pytest.mark.parametrize("target", ["onnxruntime", "paper"])
def test_model_rebuilt_from_the_integer_file_computes_the_fake_quant_model(tmp_path, target):
    model, path = resnet8_integer_file(tmp_path, target=target)
    loaded = load_integer(path)
    rebuilt = loaded.quantized_model()
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=1e-6, atol=1e-6)
    again = load_integer(export_integer(rebuilt, tmp_path / "again.npz", loaded.meta).path)
    assert again.output_points == loaded.output_points
    assert ({name: layer.input for name, layer in again.layers.items()}
            == {name: layer.input for name, layer in loaded.layers.items()})
    state, state_again = loaded.state_dict(), again.state_dict()
    assert state.keys() == state_again.keys()
    assert all(torch.equal(state_again[k], v) for k, v in state.items())
    with np.load(path) as data:
        manifest = json.loads(data["__manifest__"].tobytes().decode())
    assert manifest["version"] == 2
    if target == "paper":
        assert "output_points" not in manifest and not loaded.output_points


def test_a_version_1_integer_file_still_loads(tmp_path):
    """Version 1 wrote what version 2 writes for a model without active output points, and
    no weight range (which is read as the whole grid of the layer's bit width)."""
    model, path = resnet8_integer_file(tmp_path)

    def as_version_1(manifest):
        manifest.update(version=1)
        for layer in manifest["layers"]:
            del layer["weight_range"]
    rewrite_manifest(path, as_version_1)
    loaded = load_integer(path)
    assert loaded.version == 1 and not loaded.output_points
    assert all((layer.weight.lo, layer.weight.hi) == integer_range(layer.weight.bits,
                                                                   layer.weight.signed)
               for layer in loaded.layers.values())
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.quantized_model()(x), model(x), rtol=1e-6, atol=1e-6)


def test_integer_files_without_the_output_points_a_model_needs_are_refused(tmp_path):
    _, path = resnet8_integer_file(tmp_path, target="onnxruntime")

    def as_version_1(manifest):
        for point in manifest.pop("output_points"):
            del manifest["table"][f"{point['name']}.scale"]
        manifest["version"] = 1

    rewrite_manifest(path, as_version_1)
    loaded = load_integer(path)
    assert not loaded.output_points and loaded.float_model() is not None
    with pytest.raises(CheckpointError, match="version-1 integer file records no output points"):
        loaded.quantized_model()
    rewrite_manifest(path, lambda manifest: manifest.update(version=3))
    with pytest.raises(CheckpointError, match="version 3"):
        load_integer(path)
    rewrite_manifest(path, lambda manifest: manifest.update(version=2, meta={"model": "resnet8"}))
    with pytest.raises(CheckpointError, match="no QuantConfig"):
        load_integer(path).quantized_model()


# -- ONNX -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", ["w4a4", "w2a2"])
def test_resnet8_onnx_matches_fake_quant(tmp_path, bits):
    model = quantized(build_model("resnet8"), bits)
    written, logits, reference = run_both(model, tmp_path / "m.onnx")
    assert_agrees(logits, reference)
    proto = onnx.load(tmp_path / "m.onnx")
    onnx.checker.check_model(proto, full_check=True)
    narrow = int(bits[1]) in runtime_narrow_bits()
    assert written.opset == ({4: 21, 2: 25}[int(bits[1])] if narrow else 20)
    weights = weight_initializers(proto)
    assert len(weights) == len(quant_layers(model))
    for name, layer in quant_layers(model):
        init = weights[f"{name}.weight_q"]
        w_bits = layer.bits[0]
        assert init.data_type in INTEGER_TYPES
        assert (init.data_type in NARROW) == (narrow and w_bits < 8)
        values = numpy_helper.to_array(init).astype(np.int64)
        lo, hi = integer_range(w_bits, layer.weight_quantizer.signed)
        assert lo <= values.min() and values.max() <= hi
        assert np.array_equal(values, integer_weight(layer).q.numpy())
    ops = {node.op_type for node in proto.graph.node}
    assert "BatchNormalization" in ops  # BN kept, so the weights stay the integers


def _with_outputs(proto, names, cast=False):
    """`proto` with extra uint8 graph outputs (cast to int32 first: narrow types have no numpy)."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for name in names:
        out = name
        if cast:
            out = f"{name}_int32"
            proto.graph.node.append(helper.make_node("Cast", [name], [out], to=TensorProto.INT32))
        elem = TensorProto.INT32 if cast else TensorProto.UINT8
        proto.graph.output.append(helper.make_tensor_value_info(out, elem, None))
    return proto


@pytest.mark.parametrize("storage", ["int8", "narrow"])
def test_two_bit_activations_stay_on_four_levels(tmp_path, storage):
    model = quantized(build_model("resnet8"), "w2a2")
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    export_onnx(model, tmp_path / "m.onnx", x[:1], storage=storage)
    proto = onnx.load(tmp_path / "m.onnx")
    a_bits = {f"{name}.input_zero_point": layer.bits[1] for name, layer in quant_layers(model)}
    quantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(a_bits) == sorted(n.input[2] for n in quantize)
    two_bit = [n.output[0] for n in quantize if a_bits[n.input[2]] == 2]
    assert len(two_bit) == len(a_bits) - 2  # all but the 8-bit first and last layer
    clips = {n.input[0]: n.output[0] for n in proto.graph.node if n.op_type == "Clip"}
    if storage == "int8":  # uint8 QuantizeLinear saturates to [0, 255]: a Clip keeps [0, 3]
        assert sorted(clips) == sorted(two_bit)
        names = [clips[q] for q in two_bit] + two_bit
        probe = _with_outputs(proto, names)
    else:  # UINT2 holds [0, 3] by itself
        assert not clips
        names = two_bit
        probe = _with_outputs(proto, names, cast=True)
    (tmp_path / "probe.onnx").write_bytes(probe.SerializeToString())
    outputs = OnnxModel(tmp_path / "probe.onnx").session.run(None, {"input": x.numpy()})[1:]
    for values in outputs[:len(two_bit)]:
        assert set(np.unique(values).tolist()) <= {0, 1, 2, 3}
    if storage == "int8":  # the Clip does work: QuantizeLinear alone leaves the 2-bit grid
        assert max(int(v.max()) for v in outputs[len(two_bit):]) > 3


@pytest.mark.parametrize("quantizer", ["lsq+", "pact", "minmax"])
def test_quantizer_families_export(tmp_path, quantizer):
    model = quantized(build_model("resnet8"), "w4a4", quantizer, symmetric_inputs=False)
    written, logits, reference = run_both(model, tmp_path / "m.onnx")
    assert_agrees(logits, reference)
    stem = written.layers[0]
    assert stem.clipped == (quantizer == "pact")  # signed PACT clips to [-127, 127], not -128


def test_mobilenet_v2_depthwise_onnx_matches_fake_quant(tmp_path):
    model = quantized(build_model("mobilenet_v2"), "w4a4", size=16)
    _, logits, reference = run_both(model, tmp_path / "m.onnx", size=16, n=32)
    assert_agrees(logits, reference)
    proto = onnx.load(tmp_path / "m.onnx")
    depthwise = [n for n in proto.graph.node if n.op_type == "Conv"
                 and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert depthwise and all("DequantizeLinear" in n.input[1] for n in depthwise)


def test_small_vit_onnx_matches_fake_quant(tmp_path):
    model = quantized(VisionTransformer(dim=48, depth=2, heads=3), "w4a4")
    written, logits, reference = run_both(model, tmp_path / "m.onnx")
    # A one-step flip inside attention can move that image's logits a lot: no max bound here.
    assert_agrees(logits, reference, max_rel=None)
    assert len(weight_initializers(onnx.load(tmp_path / "m.onnx"))) == len(written.layers) == 10


def test_export_refuses_float_model_and_unknown_storage(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ConfigError, match="quantized model"):
        export_onnx(build_model("resnet8"), tmp_path / "m.onnx", x)
    with pytest.raises(ConfigError, match="quantized model"):
        export_integer(build_model("resnet8"), tmp_path / "m.npz")
    with pytest.raises(ConfigError, match="storage must be one of"):
        export_onnx(quantized(build_model("resnet8")), tmp_path / "m.onnx", x, storage="int3")


# -- CLI --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, synthetic):
    """A w4a4 resnet8 run folder on synthetic data: calibrated, then two SGD steps (LSQ)."""
    run = tmp_path_factory.mktemp("run")
    train, _ = synthetic
    pipeline = pipeline_for("synthetic")
    config = QuantConfig(w_bits=4, a_bits=4)
    torch.manual_seed(0)
    model = quantize_model(build_model("resnet8"), config)
    calibrate(model, calibration_batches(train, pipeline, 64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(2):
        images = pipeline(train.images[step * 32:(step + 1) * 32], train=True)
        loss = torch.nn.functional.cross_entropy(model(images), train.labels[step * 32:(step + 1) * 32])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    meta = {"model": "resnet8", "num_classes": 10, "in_channels": 3,
            "data": DataConfig(name="synthetic").to_dict(), "quant": config.to_dict()}
    save_atomic({"meta": meta, "model": model.state_dict()}, run / MODEL_NAME)
    return run


def test_cli_export_onnx_and_eval_onnx(tiny_run, tmp_path, capsys):
    path = tmp_path / "m.onnx"
    assert main(["export", str(tiny_run), "--format", "onnx", "-o", str(path),
                 "--check-images", "64"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {path}" in out and "on 64 test images" in out
    if 4 in runtime_narrow_bits():
        assert "opset 21" in out and "4-bit weights as uint4" in out
    assert main(["eval", str(tiny_run), "--onnx", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["onnx"]["differing"] <= 3  # of 256 test images
    assert abs(result["onnx"]["acc"] - result["acc"]) <= 100 * 3 / 256


def test_cli_export_int_and_errors(tiny_run, tmp_path, capsys):
    path = tmp_path / "m.npz"
    assert main(["export", str(tiny_run), "--format", "int", "-o", str(path)]) == 0
    assert "x smaller" in capsys.readouterr().out
    assert load_integer(path).meta["model"] == "resnet8"
    assert main(["eval", str(tiny_run), "--onnx", str(tmp_path / "none.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "none.onnx: no such ONNX file" in err


def test_a_registered_export_format_is_a_cli_choice(tiny_run, tmp_path, capsys):
    from flatq.export import EXPORT_FORMATS, ExportFormat, register_format

    def write_names(model, state, output, options):
        output.write_text("\n".join(name for name, _ in quant_layers(model)))
        return [f"wrote {output}"]

    register_format(ExportFormat("names", ".txt", "the quantized layers' names", write_names))
    try:
        path = tmp_path / "layers.txt"
        assert main(["export", str(tiny_run), "--format", "names", "-o", str(path)]) == 0
        assert capsys.readouterr().out.strip() == f"wrote {path}"
        assert path.read_text().splitlines()[0] == "stem.0"
        assert main(["export", str(tiny_run), "--format", "names", "-o", "x.onnx"]) == 2
        assert "writes a .txt file" in capsys.readouterr().err
    finally:
        del EXPORT_FORMATS["names"]
    with pytest.raises(SystemExit):
        main(["export", str(tiny_run), "--format", "names", "-o", "x.txt"])
    assert "invalid choice: 'names'" in capsys.readouterr().err
