"""Model conversion: layer swap, bit-width policy, calibration side effects, numerics and
state_dict round trips."""

import pytest
import torch
from torch import nn

from flatq import QuantConfig, calibrate, quantize_model
from flatq.errors import ConfigError
from flatq.models import build_model
from flatq.quant import (DoReFaWeightQuantizer, LSQPlusQuantizer, LSQQuantizer, MinMaxQuantizer,
                         PACTQuantizer, QuantConv2d, QuantLinear, describe, named_quantizers,
                         quant_layers)


def float_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def settled(name: str, seed: int = 0) -> nn.Module:
    """A model whose BatchNorm statistics have seen data, in eval mode (outputs not ~0)."""
    torch.manual_seed(seed)
    model = build_model(name)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32))
    return model.eval()


def calibration_data(n: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 32, 32, generator=g) for _ in range(n)]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def resnet8():
    return settled("resnet8")


def test_float_model_untouched(resnet8):
    before = {k: v.clone() for k, v in resnet8.state_dict().items()}
    types = [type(m) for m in resnet8.modules()]
    qmodel = calibrate(quantize_model(resnet8, QuantConfig()), calibration_data())
    with torch.no_grad():
        for p in qmodel.parameters():
            p.add_(1.0)  # the copy owns its tensors: the float model must not see this
    assert [type(m) for m in resnet8.modules()] == types
    assert not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in resnet8.modules())
    after = resnet8.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("name", ["resnet8", "mobilenet_v2", "vit_tiny"])
def test_every_conv_and_linear_swapped_with_configured_bits(name):
    model = build_model(name)
    names = float_layers(model)
    qmodel = quantize_model(model, QuantConfig(w_bits=2, a_bits=4))
    assert float_layers(qmodel) == []
    rows = describe(qmodel)
    assert [r["name"] for r in rows] == names
    for row in rows:
        expected = "QuantLinear" if isinstance(model.get_submodule(row["name"]), nn.Linear) \
            else "QuantConv2d"
        assert row["type"] == expected
    bits = [(r["w_bits"], r["a_bits"]) for r in rows]
    assert bits[0] == bits[-1] == (8, 8)
    assert set(bits[1:-1]) == {(2, 4)}
    # the state_dict keeps the float names (so a float checkpoint's weights still line up)
    float_keys = set(model.state_dict())
    assert float_keys <= set(qmodel.state_dict())


def test_edge_bits_none_quantizes_all_layers_alike():
    qmodel = quantize_model(build_model("resnet8"), QuantConfig(w_bits=3, a_bits=5, edge_bits=None))
    assert {(r["w_bits"], r["a_bits"]) for r in describe(qmodel)} == {(3, 5)}
    assert len(describe(qmodel)) == 10


def test_edge_bits_value_applies_to_first_and_last():
    rows = describe(quantize_model(build_model("resnet8"), QuantConfig(edge_bits=6)))
    assert (rows[0]["name"], rows[-1]["name"]) == ("stem.0", "linear")
    assert [(r["w_bits"], r["a_bits"]) for r in rows] == [(6, 6)] + [(4, 4)] * 8 + [(6, 6)]


def test_edge_weights_minmax_gives_the_first_and_last_layer_weight_ranges_that_follow_the_weights():
    torch.manual_seed(0)
    qmodel = quantize_model(build_model("resnet8"), QuantConfig(edge_weights="minmax"))
    calibrate(qmodel, [torch.randn(8, 3, 32, 32)])
    kinds = {name: type(m.weight_quantizer) for name, m in quant_layers(qmodel)}
    assert kinds.pop("stem.0") is MinMaxQuantizer and kinds.pop("linear") is MinMaxQuantizer
    assert set(kinds.values()) == {LSQQuantizer}
    assert type(qmodel.stem[0].input_quantizer) is LSQQuantizer    # inputs keep their family
    stem = qmodel.stem[0]
    with torch.no_grad():
        stem.weight.mul_(100.0)                                     # far past the calibrated range
    w = stem.weight.detach()
    w_hat = stem.weight_quantizer(w)
    # 8-bit per-channel min-max grid of the current weights: error at most half a step
    step = (w.flatten(1).amax(1).clamp_min(0) - w.flatten(1).amin(1).clamp_max(0)) / 255
    assert ((w_hat - w).abs().flatten(1).amax(1) <= step / 2 + 1e-4).all()
    assert not any(p.requires_grad for p in stem.weight_quantizer.parameters())


@pytest.mark.parametrize("policy", ["minmax", "learned"])
def test_eight_bit_weights_choose_the_quantizer_of_every_8_bit_inner_layer(policy):
    # W4A4 with one inner layer overridden to 8 bits: only that one follows the option
    config = QuantConfig(eight_bit_weights=policy, edge_weights="learned",
                         overrides=[{"pattern": "stages.1.*", "w_bits": 8}])
    qmodel = quantize_model(build_model("resnet8"), config)
    eight = MinMaxQuantizer if policy == "minmax" else LSQQuantizer
    for name, layer in quant_layers(qmodel):
        expected = eight if name.startswith("stages.1.") else LSQQuantizer
        assert type(layer.weight_quantizer) is expected, name
    wide = [layer for name, layer in quant_layers(qmodel) if name.startswith("stages.1.")]
    assert wide and all(layer.weight_quantizer.bits == 8 for layer in wide)


def test_overrides_by_pattern_including_skip():
    config = QuantConfig(w_bits=4, a_bits=4, overrides=[
        {"pattern": "stages.2.*", "w_bits": 8},
        {"pattern": "stages.1.0.shortcut.0", "skip": True},
        {"pattern": "linear", "a_bits": 2},
    ])
    qmodel = quantize_model(build_model("resnet8"), config)
    bits = {r["name"]: (r["w_bits"], r["a_bits"]) for r in describe(qmodel)}
    assert "stages.1.0.shortcut.0" not in bits
    assert type(qmodel.get_submodule("stages.1.0.shortcut.0")) is nn.Conv2d
    assert bits["stem.0"] == (8, 8)
    assert bits["linear"] == (8, 2)  # edge bits first, then the override
    assert bits["stages.0.0.residual.0.0"] == (4, 4)
    for name in ("stages.2.0.residual.0.0", "stages.2.0.residual.1.0", "stages.2.0.shortcut.0"):
        assert bits[name] == (8, 4), name
    assert len(bits) == 9


def test_override_matching_nothing_is_a_config_error():
    config = QuantConfig(overrides=[{"pattern": "layer4.*", "w_bits": 8}])
    with pytest.raises(ConfigError, match=r"layer4\.\*.*match no layer"):
        quantize_model(build_model("resnet8"), config)


def test_model_without_layers_is_a_config_error():
    with pytest.raises(ConfigError, match="no layer to quantize"):
        quantize_model(nn.Sequential(nn.ReLU()), QuantConfig())


@pytest.mark.parametrize("kind, weight_cls, input_cls", [
    ("lsq", LSQQuantizer, LSQQuantizer),
    ("lsq+", LSQQuantizer, LSQPlusQuantizer),
    ("pact", MinMaxQuantizer, PACTQuantizer),
    ("minmax", MinMaxQuantizer, MinMaxQuantizer),
])
def test_quantizer_families(kind, weight_cls, input_cls):
    # learned edges: the first and last layer take the family's weight quantizer too
    qmodel = quantize_model(build_model("resnet8"),
                            QuantConfig(quantizer=kind, edge_weights="learned"))
    for _, layer in quant_layers(qmodel):
        assert type(layer.weight_quantizer) is weight_cls
        assert type(layer.input_quantizer) is input_cls
        assert layer.weight_quantizer.per_channel
        assert layer.weight_quantizer.num_channels == layer.weight.shape[0]
        assert not layer.input_quantizer.per_channel


def test_pact_dorefa_weights_on_inner_layers_minmax_on_the_edges():
    config = QuantConfig(quantizer="pact", pact_weights="dorefa")
    qmodel = quantize_model(build_model("resnet8"), config)
    layers = quant_layers(qmodel)
    edges = {layers[0][0], layers[-1][0]}
    for name, layer in layers:
        expected = MinMaxQuantizer if name in edges else DoReFaWeightQuantizer
        assert type(layer.weight_quantizer) is expected, name
        assert type(layer.input_quantizer) is PACTQuantizer
    with pytest.raises(ConfigError, match="pact_weights"):
        QuantConfig(pact_weights="tanh")


def test_lsqplus_continuous_offset_reaches_the_inputs_and_export_refuses_it():
    from flatq.export.integer_view import input_grid
    qmodel = quantize_model(build_model("resnet8"),
                            QuantConfig(quantizer="lsq+", lsqplus_offset="continuous"))
    calibrate(qmodel, calibration_data())
    layer = quant_layers(qmodel)[1][1]
    assert all(layer.input_quantizer.continuous for _, layer in quant_layers(qmodel))
    with pytest.raises(ConfigError, match="continuous offset"):
        input_grid(layer)


def test_symmetric_options_reach_the_quantizers():
    qmodel = quantize_model(build_model("resnet8"),
                            QuantConfig(symmetric_weights=True, symmetric_inputs=False))
    for _, layer in quant_layers(qmodel):
        assert layer.weight_quantizer.signed and not layer.input_quantizer.signed


def test_calibrate_leaves_batchnorm_and_weights_alone(resnet8):
    qmodel = quantize_model(resnet8, QuantConfig()).train()
    before = {k: v.clone() for k, v in qmodel.state_dict().items()
              if not k.endswith(("scale", "zero_point", "initialized", "_extra_state",
                                 "running_min", "running_max"))}   # quantizer ranges
    assert any("running_mean" in k for k in before)
    calibrate(qmodel, calibration_data())
    assert qmodel.training  # the mode it had is restored
    after = qmodel.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert all(bool(q.initialized) for _, q in named_quantizers(qmodel))
    assert all(q.observer is None for _, q in named_quantizers(qmodel))


def test_calibrate_without_batches_or_quantizers_is_an_error(resnet8):
    with pytest.raises(ConfigError, match="no calibration batches"):
        calibrate(quantize_model(resnet8, QuantConfig()), [])
    with pytest.raises(ConfigError, match="no quantizer"):
        calibrate(resnet8, calibration_data())


def test_uncalibrated_model_refuses_to_run(resnet8):
    with pytest.raises(RuntimeError, match="calibrate"):
        quantize_model(resnet8, QuantConfig())(torch.randn(2, 3, 32, 32))


def test_8_bit_close_to_float_and_2_bit_further(resnet8):
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = resnet8(x)
        errors = {}
        for bits in (8, 2):
            qmodel = quantize_model(resnet8, QuantConfig(w_bits=bits, a_bits=bits, edge_bits=None))
            errors[bits] = relative_error(calibrate(qmodel, calibration_data()).eval()(x), ref)
    assert errors[8] < 0.05
    assert errors[2] > 5 * errors[8]


def test_state_dict_round_trip_without_calibration(resnet8):
    config = QuantConfig(w_bits=3, a_bits=4, quantizer="lsq+", edge_weights="learned")
    source = calibrate(quantize_model(resnet8, config), calibration_data()).eval()
    with torch.no_grad():  # make the learned parameters differ from a fresh calibration
        for _, q in named_quantizers(source):
            q.scale.mul_(1.1)
    fresh = quantize_model(build_model("resnet8"), config)
    fresh.load_state_dict(source.state_dict())
    fresh.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), source(x), rtol=0, atol=0)


def test_state_dict_of_other_bits_refused(resnet8):
    source = calibrate(quantize_model(resnet8, QuantConfig(w_bits=4, a_bits=4)), calibration_data())
    target = quantize_model(build_model("resnet8"), QuantConfig(w_bits=2, a_bits=4))
    with pytest.raises(ValueError, match="4-bit.*2-bit"):
        target.load_state_dict(source.state_dict())


class Branchy(nn.Module):
    """A user model with data-dependent Python control flow (untraceable by torch.fx)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)])
        self.heads = nn.ModuleDict({"pos": nn.Linear(8, 5), "neg": nn.Linear(8, 5)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.convs[0](x))
        for _ in range(int(x.mean().item() > 0.1) + 1):
            x = torch.relu(self.convs[1](x))
        feature = x.mean(dim=(2, 3))
        return self.heads["pos" if feature.sum() > 0 else "neg"](feature)


def test_arbitrary_module_with_control_flow():
    torch.manual_seed(0)
    model = Branchy().eval()
    qmodel = quantize_model(model, QuantConfig(w_bits=8, a_bits=8, edge_bits=None))
    assert float_layers(qmodel) == []
    assert [n for n, _ in quant_layers(qmodel)] == ["convs.0", "convs.1", "heads.pos", "heads.neg"]
    # The 'neg' head never runs on positive features: calibration must say which quantizer missed.
    with pytest.raises(ConfigError, match="never ran"):
        calibrate(qmodel, calibration_data())
    qmodel = quantize_model(model, QuantConfig(
        w_bits=8, a_bits=8, edge_bits=None, overrides=[{"pattern": "heads.neg", "skip": True}]))
    calibrate(qmodel, calibration_data())
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(qmodel.eval()(x), model(x)) < 0.05


# -- what is quantized: subclasses, Conv1d, attention, and the plan ---------------------------

class Marked(nn.Linear):
    """A Linear subclass computing what nn.Linear does (as NonDynamicallyQuantizableLinear)."""


class Scaled(nn.Linear):
    """A Linear subclass that changes the computation: quantizing it as nn.Linear would be wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose1d(8, 8, 2, stride=2)
        self.marked = Marked(16, 16)
        self.scaled = Scaled(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(torch.relu(self.conv1d(x)))           # (B, 8, 16)
        return self.head(self.scaled(self.marked(x)).mean(1))


def test_subclasses_and_conv1d_are_quantized_and_the_rest_reported():
    torch.manual_seed(0)
    model = Mixed().eval()
    qmodel = quantize_model(model, QuantConfig(w_bits=4, a_bits=4))
    plan = qmodel.quant_plan
    assert [(r.name, r.w_bits) for r in plan.quantized] == [("conv1d", 8), ("marked", 4),
                                                             ("head", 8)]
    assert type(qmodel.marked) is QuantLinear and type(qmodel.conv1d).__name__ == "QuantConv1d"
    reasons = {r.name: r.reason for r in plan.float}
    assert set(reasons) == {"up", "scaled"}
    assert "transposed" in reasons["up"] and "overrides the forward" in reasons["scaled"]
    assert type(qmodel.scaled) is Scaled
    text = str(plan)
    for name in ("conv1d", "marked", "head", "up", "scaled"):
        assert f"  {name}  " in text
    x = torch.randn(8, 3, 8)
    calibrate(qmodel, [x])
    with torch.no_grad():
        assert relative_error(qmodel.eval()(x), model(x)) < 0.1


def test_no_layer_at_the_inner_bits_is_a_warning_in_the_plan():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 5, 5))
    with pytest.warns(UserWarning, match="no layer is quantized at the inner bit width w4a4"):
        qmodel = quantize_model(model, QuantConfig())
    assert "warning: no layer" in qmodel.quant_plan.summary()
    assert quantize_model(build_model("resnet8"), QuantConfig()).quant_plan.warnings == []


class ReadsWeight(nn.Module):
    """Hands its child's weight to a function, as torchvision's Swin attention does."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.out.weight.dtype              # reading metadata is fine
        return self.out(nn.functional.linear(x, self.qkv.weight, self.qkv.bias).to(dtype))


def test_a_weight_read_by_the_parent_is_refused_by_name_with_the_skip_option():
    model = nn.Sequential(nn.Linear(8, 8), ReadsWeight(), nn.Linear(8, 2))
    with pytest.raises(ConfigError, match=r"1\.qkv \(ReadsWeight\.forward reads self\.qkv\.weight\)"
                       r".*--skip '1\.qkv' \(quant\.skip\)"):
        quantize_model(model, QuantConfig())
    qmodel = quantize_model(model, QuantConfig(skip=["1.qkv"]))
    assert [r.name for r in qmodel.quant_plan.quantized] == ["0", "1.out", "2"]
    assert [(r.name, r.reason) for r in qmodel.quant_plan.float] == [
        ("1.qkv", "skipped by quant.skip '1.qkv'")]
    calibrate(qmodel, [torch.randn(4, 8)])


def test_skip_covers_everything_inside_a_module_and_unknown_patterns_are_errors():
    rows = quantize_model(build_model("resnet8"), QuantConfig(skip=["stages.1"])).quant_plan
    skipped = [r.name for r in rows.float if r.reason.startswith("skipped")]
    assert skipped and all(n.startswith("stages.1.") for n in skipped)
    assert not any(r.name.startswith("stages.1.") for r in rows.quantized)
    with pytest.raises(ConfigError, match=r"\['layer9'\] match no layer"):
        quantize_model(build_model("resnet8"), QuantConfig(skip=["layer9"]))


def test_skip_is_a_cli_flag():
    from flatq.cli import build_parser
    from flatq.cli.options import build_run_config
    args = build_parser().parse_args(["qat", "--from", "fp", "--out", "q",
                                      "--skip", "stages.1.*,linear"])
    assert build_run_config(args, "lsq", quantized=True).quant.skip == ["stages.1.*", "linear"]


class SecondOnly(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[1](x)                        # self[0] never runs


def test_calibrate_names_layers_that_never_ran():
    model = SecondOnly(nn.Linear(4, 4), nn.Linear(4, 4))
    qmodel = quantize_model(model, QuantConfig(w_bits=8, a_bits=8))
    with pytest.raises(ConfigError, match=r"never ran.*\['0'\].*--skip"):
        calibrate(qmodel, [torch.randn(2, 4)])


# -- nn.MultiheadAttention ---------------------------------------------------------------------

class Attend(nn.Module):
    def __init__(self, batch_first: bool, **kwargs) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        x = self.embed(x)
        return self.attn(x, *(args or (x, x)), **kwargs)


def observing(model: nn.Module) -> nn.Module:
    """Quantizers in calibration mode pass tensors through unchanged: the float computation."""
    for _, q in named_quantizers(model):
        q.start_observing()
    return model


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", ["self", "cross", "masks", "weights", "unbatched"])
def test_quantized_attention_computes_what_multihead_attention_does(batch_first, case):
    torch.manual_seed(0)
    model = Attend(batch_first).eval()
    qmodel = observing(quantize_model(model, QuantConfig(w_bits=8, a_bits=8)))
    assert type(qmodel.attn).__name__ == "QuantMultiheadAttention"
    assert type(qmodel.attn.out_proj) is QuantLinear
    shape = (3, 5, 6) if batch_first else (5, 3, 6)
    x = torch.randn(*shape)
    args, kwargs = (), {"need_weights": False}
    if case == "cross":
        memory = torch.randn(*((3, 7, 8) if batch_first else (7, 3, 8)))
        args = (memory, memory)
    elif case == "masks":
        kwargs["attn_mask"] = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
        padding = torch.zeros(3, 5, dtype=torch.bool)
        padding[:, 4] = True
        kwargs["key_padding_mask"] = padding
    elif case == "weights":
        kwargs = {"need_weights": True, "average_attn_weights": False,
                  "attn_mask": torch.randn(6, 5, 5)}
    elif case == "unbatched":
        x, kwargs = x[:, 0] if not batch_first else x[0], {}
    with torch.no_grad():
        out, weights = qmodel(x, *args, **kwargs)
        ref, ref_weights = model(x, *args, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (weights is None) == (ref_weights is None)
    if weights is not None:
        torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-5)


def test_quantized_attention_keeps_parameter_names_and_quantizes_at_8_bits_closely():
    torch.manual_seed(0)
    model = Attend(True).eval()
    # learned 8-bit weights (the block is the first layer): its step size must learn
    qmodel = quantize_model(model, QuantConfig(w_bits=8, a_bits=8, edge_weights="learned",
                                               eight_bit_weights="learned"))
    assert set(model.state_dict()) <= set(qmodel.state_dict())
    assert {"attn.in_proj_weight", "attn.out_proj.weight"} <= set(model.state_dict())
    x = torch.randn(4, 5, 6)
    calibrate(qmodel, [x])
    with torch.no_grad():
        assert relative_error(qmodel.eval()(x)[0], model(x)[0]) < 0.05
    loss = qmodel.train()(x)[0].square().mean()
    loss.backward()
    assert qmodel.attn.in_proj_weight.grad.abs().sum() > 0
    assert qmodel.attn.weight_quantizer.scale.grad.abs().sum() > 0


def test_attention_options_not_reimplemented_stay_float_with_their_out_proj():
    model = Attend(True, add_bias_kv=True)
    plan = quantize_model(model, QuantConfig(edge_bits=None)).quant_plan
    reasons = {r.name: r.reason for r in plan.float}
    assert "add_bias_kv" in reasons["attn"]
    assert "inside the float nn.MultiheadAttention" in reasons["attn.out_proj"]
    assert [r.name for r in plan.quantized] == ["embed"]


def test_weights_and_inputs_pick_their_quantizers_independently(resnet8):
    # LSQ weights with PACT inputs: each side from its own registered family, and it trains.
    config = QuantConfig(weight_quantizer="lsq", input_quantizer="pact", edge_bits=None,
                         edge_weights="learned")
    qmodel = calibrate(quantize_model(resnet8, config), calibration_data())
    for _, layer in quant_layers(qmodel):
        assert type(layer.weight_quantizer) is LSQQuantizer
        assert type(layer.input_quantizer) is PACTQuantizer
    from flatq.config import TrainConfig
    from flatq.train.optim import build_optimizer
    optimizer = build_optimizer(qmodel.train(), TrainConfig(weight_decay=1e-3))
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0
                for p in g["params"]}
    layer = quant_layers(qmodel)[1][1]
    assert id(layer.weight_quantizer.scale) in no_decay      # LSQ step sizes: no decay
    assert id(layer.input_quantizer.alpha) not in no_decay   # PACT's alpha: its L2 penalty
    loss = nn.functional.cross_entropy(qmodel(calibration_data(1)[0]), torch.zeros(16).long())
    optimizer.zero_grad()
    loss.backward()
    assert layer.weight_quantizer.scale.grad is not None
    assert layer.input_quantizer.alpha.grad is not None
    optimizer.step()
    # The unset side falls back to `quantizer`.
    default = QuantConfig(quantizer="pact", weight_quantizer="lsq")
    assert (default.weight_family, default.input_family) == ("lsq", "pact")


def test_a_registered_quantizer_is_a_config_choice_and_builds(resnet8):
    from flatq.config import QUANTIZER_NAMES
    from flatq.quant.quantizers import QUANTIZERS, register_quantizer

    @register_quantizer("test-lsq")
    class TestQuantizer(LSQQuantizer):
        pass

    try:
        qmodel = quantize_model(resnet8, QuantConfig(input_quantizer="test-lsq"))
        assert all(type(layer.input_quantizer) is TestQuantizer
                   for _, layer in quant_layers(qmodel))
    finally:
        del QUANTIZERS["test-lsq"]
        QUANTIZER_NAMES.remove("test-lsq")
    with pytest.raises(ConfigError, match="test-lsq"):
        QuantConfig(input_quantizer="test-lsq")


def test_the_quantizers_module_is_not_shadowed():
    import flatq.quant
    import flatq.quant.quantizers as module
    assert flatq.quant.quantizers is module
    assert callable(flatq.quant.named_quantizers)
