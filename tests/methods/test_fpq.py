"""FPQ and its baselines (issue 3): SFP noise, CSD, KD, SAM, and a tiny FPQ run via the CLI.

Every numeric claim is checked against a computation written out here independently of the
code under test: PyTorch's batch_norm for the channel standardization, a hand-made KL for KD,
a hand-made two-pass update on a copy of the model for SAM, and hooks that read the tensors
the layers really see for SFP.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torchvision
import yaml
from torch import nn
from torch.nn import functional as F

from flatq.cli import main as flatq_main
from flatq.config import QuantConfig, method_config
from flatq.errors import ConfigError
from flatq.methods import (FPQ, KD, SAM, FPQConfig, KDConfig, SAMConfig, TaskObjective,
                           build_objective)
from flatq.methods.csd import channel_rows, csd_channel_errors, csd_loss
from flatq.methods.kd import kd_loss
from flatq.methods.sfp import NOISE_LEVELS, StochasticFeaturePerturbation, uniform_noise
from flatq.models import build_model
from flatq.models.vit import VisionTransformer
from flatq.quant import (QuantConv2d, QuantLinear, QuantMultiheadAttention, Quantizer, calibrate,
                         quant_layers, quantize_model)
from flatq.runs import load_model

CONVS = ["0", "2", "4", "6"]          # conv layers of `tiny_fp`; "9" is the Linear
INNER = ["2", "4", "6"]               # every quantized layer but the first and the last


def tiny_fp(seed: int = 0) -> nn.Module:
    """Four 3x3 convs and a classifier: five quantizable layers, no BatchNorm (so train and
    eval mode differ only by SFP)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for c_in in (3, 8, 8, 8):
        layers += [nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def labels(n: int = 4) -> torch.Tensor:
    return torch.arange(n) % 10


def tiny_student(teacher: nn.Module, w_bits: int = 4, a_bits: int = 4) -> nn.Module:
    # learned edges: the tests follow gradients into every layer's weight step size
    student = quantize_model(teacher, QuantConfig(w_bits=w_bits, a_bits=a_bits,
                                                  edge_weights="learned"))
    return calibrate(student, [images(16, seed=2)])


def fake_quant_reference(x: torch.Tensor, quantizer: Quantizer) -> torch.Tensor:
    """(clamp(round(x / s) + z, qmin, qmax) - z) * s with the quantizer's effective s, z."""
    s, z = quantizer.scale_and_zero_point()
    return (torch.clamp(torch.round(x / s) + z, quantizer.qmin, quantizer.qmax) - z) * s


class NoiseProbe:
    """Records, per layer and forward pass, what SFP added: the difference between the
    tensor the layer's conv receives and the one it would have received without noise.

    Attach after SFP so that these hooks run after SFP's own and see its result.
    """

    def __init__(self, model: nn.Module, names: list[str], site: str) -> None:
        self.layers = dict(quant_layers(model))
        self.site = site
        self.deltas: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.seen: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
        for name in names:
            layer = self.layers[name]
            layer.register_forward_pre_hook(self._store(name, "raw"))
            layer.input_quantizer.register_forward_hook(self._quantizer(name))
            layer.input_perturbation.register_forward_hook(self._conv_input(name))
            layer.register_forward_hook(self._output(name))

    def _store(self, name, key):
        def hook(module, inputs):
            self.seen[name][key] = inputs[0].detach().clone()
        return hook

    def _quantizer(self, name):
        def hook(module, inputs, output):
            self.seen[name]["q_in"] = inputs[0].detach().clone()
            self.seen[name]["q_out"] = output.detach().clone()
        return hook

    def _conv_input(self, name):
        def hook(module, inputs, output):
            self.seen[name]["conv_in"] = output.detach().clone()
        return hook

    def _output(self, name):
        def hook(module, inputs, output):
            seen = self.seen[name]
            seen["out"] = output.detach().clone()
            if self.site == "after":
                delta = seen["conv_in"] - seen["q_out"]
            else:
                delta = seen["q_in"] - seen["raw"]
            self.deltas[name].append(delta)
        return hook

    def fired(self, name: str) -> list[bool]:
        return [bool(d.abs().max() > 0) for d in self.deltas[name]]


# -- SFP ------------------------------------------------------------------------------------

@pytest.mark.parametrize("site", ["after", "before"])
def test_sfp_noise_is_uniform_within_half_a_step_and_reaches_the_conv(site):
    student = tiny_student(tiny_fp()).train()
    sfp = StochasticFeaturePerturbation(student, p=1.0, site=site, seed=0)
    probe = NoiseProbe(student, sfp.names, site)
    with torch.no_grad():
        student(images(32))
    for name in sfp.names:
        layer = probe.layers[name]
        s = float(layer.input_quantizer.step_size())
        (delta,) = probe.deltas[name]
        assert delta.abs().max() <= s / 2 * (1 + 1e-5), name
        assert (delta != 0).float().mean() > 0.99, name            # fired: noise everywhere
        # U[-s/2, s/2] over ~9000 draws: both ends reached, mean ~0, std s/sqrt(12).
        assert delta.max() > 0.49 * s and delta.min() < -0.49 * s, name
        assert abs(float(delta.mean())) < 0.02 * s, name
        assert float(delta.std()) == pytest.approx(s / math.sqrt(12), rel=0.05), name
        seen = probe.seen[name]
        # The conv really computes on the perturbed input.
        expected = F.conv2d(seen["conv_in"], layer.quantized_weight(), layer.bias, padding=1)
        torch.testing.assert_close(seen["out"], expected.detach(), rtol=1e-5, atol=1e-5)
        z = layer.input_quantizer.scale_and_zero_point()[1]
        off_grid = (seen["conv_in"] / s + z - torch.round(seen["conv_in"] / s + z)).abs()
        if site == "before":
            # Noise, then the quantizer: the conv sees a quantized (on-grid) tensor, namely
            # the quantization of the perturbed raw input; nothing is added after.
            torch.testing.assert_close(seen["q_out"], fake_quant_reference(seen["q_in"], layer.input_quantizer))
            torch.testing.assert_close(seen["conv_in"], seen["q_out"], rtol=0, atol=0)
            assert off_grid.max() < 1e-3
        else:
            # The quantizer saw the raw input; the noise pushed its output off the grid.
            torch.testing.assert_close(seen["q_in"], seen["raw"], rtol=0, atol=0)
            assert off_grid.mean() > 0.1


def test_cpu_noise_takes_65536_equally_likely_levels_within_half_a_step():
    torch.manual_seed(0)
    x = torch.zeros(1, 2 ** 20 + 3)  # not a multiple of the four levels one draw gives
    step = torch.tensor([0.25])
    noise = uniform_noise(x, step)
    assert noise.abs().max() <= step / 2
    levels = noise.double() / 0.25 * NOISE_LEVELS - 0.5
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=0)
    assert levels.min() >= -NOISE_LEVELS // 2 and levels.max() < NOISE_LEVELS // 2
    counts = torch.histc(noise / 0.25, bins=16, min=-0.5, max=0.5)
    expected = noise.numel() / 16
    assert ((counts - expected).abs() / expected).max() < 0.02      # ~0.4% sampling noise
    assert float(noise.mean()) == pytest.approx(0.0, abs=1e-3 * 0.25)
    assert float(noise.std()) == pytest.approx(0.25 / math.sqrt(12), rel=5e-3)
    neighbours = torch.corrcoef(torch.stack([noise[0, :-1], noise[0, 1:]]))[0, 1]
    assert abs(float(neighbours)) < 0.01                             # draws are independent
    torch.manual_seed(0)
    torch.testing.assert_close(uniform_noise(x, step), noise, rtol=0, atol=0)
    shifted = torch.full((1, 7), 2.0)
    assert (uniform_noise(shifted, step) - 2.0).abs().max() <= 0.125


def test_sfp_frequency_matches_p_and_layers_draw_independently():
    student = tiny_student(tiny_fp()).train()
    x = images(2)
    with torch.no_grad():
        clean = student(x)
    forwards = {0.0: 60, 1.0: 30, 0.3: 400}
    for p, n in forwards.items():
        sfp = StochasticFeaturePerturbation(student, p=p, seed=123)
        probe = NoiseProbe(student, sfp.names, "after")
        with torch.no_grad():
            outputs = [student(x) for _ in range(n)]
        fired = {name: probe.fired(name) for name in sfp.names}
        for name in sfp.names:
            assert sfp.calls[name] == n
            assert sfp.fired[name] == sum(fired[name]), name      # counters tell the truth
        if p == 0.0:
            assert all(not any(f) for f in fired.values())
            assert all(torch.equal(out, clean) for out in outputs)
        elif p == 1.0:
            assert all(all(f) for f in fired.values())
        else:
            sd = math.sqrt(n * p * (1 - p))
            for name in sfp.names:
                assert abs(sum(fired[name]) - n * p) < 4 * sd, (name, sum(fired[name]))
                assert sfp.frequencies()[name] == pytest.approx(sum(fired[name]) / n)
            # One coin per layer, not one per pass: both of two layers fire ~p^2 of the time.
            both = sum(a and b for a, b in zip(fired["2"], fired["6"]))
            assert abs(both - n * p * p) < 4 * math.sqrt(n * p * p * (1 - p * p)), both
        sfp.remove()


def test_sfp_adds_nothing_in_eval_mode():
    student = tiny_student(tiny_fp()).eval()
    x = images()
    with torch.no_grad():
        clean = student(x)
        sfp = StochasticFeaturePerturbation(student, p=1.0)
        assert torch.equal(student(x), clean)
        assert all(c == 0 for c in sfp.calls.values())
        student.train()
        assert not torch.allclose(student(x), clean)   # the same hooks do fire in training


def test_sfp_default_layers_exclude_the_first_and_last_quantized_layer():
    student = tiny_student(tiny_fp())
    assert StochasticFeaturePerturbation(student).names == INNER
    assert StochasticFeaturePerturbation(student, layers=["4"]).names == ["4"]
    with pytest.raises(ConfigError, match=r"SFP layer patterns \['nope\*'\] match none"):
        StochasticFeaturePerturbation(student, layers=["nope*"])
    # On a real model the excluded layers are exactly the 8-bit edge layers.
    resnet = quantize_model(build_model("resnet8", num_classes=10, in_channels=3),
                            QuantConfig(w_bits=4, a_bits=4))
    names = StochasticFeaturePerturbation(resnet).names
    bits = dict((n, m.bits) for n, m in quant_layers(resnet))
    assert sorted(n for n, b in bits.items() if b == (8, 8)) == sorted(set(bits) - set(names))
    assert all(bits[n] == (4, 4) for n in names)


@pytest.mark.parametrize("quantized_teacher", [False, True])
def test_teacher_is_never_perturbed(quantized_teacher):
    fp = tiny_fp()
    student = tiny_student(fp)
    teacher = copy.deepcopy(student) if quantized_teacher else fp
    reference = copy.deepcopy(teacher).eval()
    seen = []
    teacher.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    objective = FPQ(student, teacher, FPQConfig(p=1.0)).train()
    objective.losses(images(), labels())
    assert not objective.teacher.training and teacher.training
    assert all(n > 0 for n in objective.sfp.fired.values())       # the student was perturbed
    with torch.no_grad():
        assert torch.equal(seen[0], reference(images()))


# -- CSD ------------------------------------------------------------------------------------

def reference_csd(student, teacher, eps=1e-5):
    """CSD written the direct way: batch-norm standardization of both maps, then MSE."""
    def norm(z):
        return F.batch_norm(z, None, None, training=True, eps=eps)
    return sum(F.mse_loss(norm(s), norm(t.detach())) for s, t in zip(student, teacher))


def test_csd_loss_is_zero_for_identical_features_and_matches_a_manual_sum():
    gen = torch.Generator().manual_seed(0)
    student = [torch.randn(4, 6, 5, 5, generator=gen), torch.randn(4, 3, 2, 2, generator=gen)]
    teacher = [torch.randn(4, 6, 5, 5, generator=gen) * 3 + 1, torch.randn(4, 3, 2, 2, generator=gen)]
    # Zero up to float32 rounding of the closed form (its terms are about 1 per element).
    assert float(csd_loss(student, [t.clone() for t in student])) == pytest.approx(0.0, abs=1e-6)
    # Standardization removes per-channel affine changes: those cost nothing either.
    shifted = [2.5 * s + 7.0 for s in student]
    assert float(csd_loss(shifted, student)) == pytest.approx(0.0, abs=1e-6)

    manual = sum(((F.batch_norm(t, None, None, training=True, eps=1e-5)
                   - F.batch_norm(s, None, None, training=True, eps=1e-5)) ** 2).sum() / s.numel()
                 for s, t in zip(student, teacher))
    loss = csd_loss(student, teacher)
    assert float(loss) > 0.5
    torch.testing.assert_close(loss, manual)
    # The teacher's tensors are only read (FPQ hands over the ones its hooks captured).
    captured = [t.clone() for t in teacher]
    csd_loss(student, captured)
    assert all(torch.equal(mine, original) for mine, original in zip(captured, teacher))
    # A constant channel (a dead ReLU map) standardizes to zeros on either side, not NaN.
    constant = [torch.ones(4, 6, 5, 5), torch.ones(4, 3, 2, 2)]
    assert float(csd_loss(constant, constant)) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(csd_loss(constant, teacher), reference_csd(constant, teacher))
    with pytest.raises(ValueError, match="matching non-empty"):
        csd_loss(student, teacher[:1])
    with pytest.raises(ValueError, match="shapes differ"):
        csd_loss(student[:1], teacher[1:])


@pytest.mark.parametrize("shape", [(6, 4, 5, 3), (16, 5)])
def test_csd_gradient_matches_batch_norm_mse_and_finite_differences(shape):
    """The closed-form backward equals autograd through batch norm + MSE (conv maps and linear
    outputs, channels of very different scale and offset in student and teacher, one nearly
    constant), and passes
    gradcheck's finite differences in float64."""
    gen = torch.Generator().manual_seed(1)
    scale = torch.tensor([0.01, 1.0, 5.0, 0.3, 2.0][:shape[1]], dtype=torch.float64)
    offset = torch.tensor([3.0, -2.0, 0.5, 8.0, 0.0][:shape[1]], dtype=torch.float64)
    view = (1, -1) + (1,) * (len(shape) - 2)
    student = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale.view(view)
               + offset.view(view))
    # The teacher's channels have their own scales (one negative) and offsets.
    teacher_scale = torch.tensor([2.0, -0.5, 1.0, 30.0, 0.1][:shape[1]], dtype=torch.float64)
    teacher = ((student + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64))
               * teacher_scale.view(view) - 4 * offset.view(view))
    ours, reference = student.clone().requires_grad_(), student.clone().requires_grad_()
    loss = csd_loss([ours], [teacher])
    expected = reference_csd([reference], [teacher])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(ours.grad, reference.grad)
    assert ours.grad.abs().max() > 1e-3
    assert torch.autograd.gradcheck(lambda z: csd_loss([z], [teacher]),
                                    (student.clone().requires_grad_(),))


def test_csd_of_channels_last_maps_matches_the_contiguous_ones():
    """train.channels_last: the maps are copied into CSD's row order, so loss and gradient are
    those of the same maps in the default layout."""
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(6, 4, 5, 3, generator=gen), torch.randn(6, 4, 5, 3, generator=gen)
    loss, grad = _value_and_grad(lambda z: csd_loss([z], [teacher]), student)
    nhwc = [t.contiguous(memory_format=torch.channels_last) for t in (student, teacher)]
    assert not nhwc[0].is_contiguous()
    loss_cl, grad_cl = _value_and_grad(lambda z: csd_loss([z], [nhwc[1]]), nhwc[0])
    torch.testing.assert_close(loss_cl, loss, rtol=0, atol=0)
    torch.testing.assert_close(grad_cl, grad, rtol=0, atol=0)
    assert grad.abs().max() > 1e-3


def plain_csd(student, teacher, eps=1e-5, channel_dim=1):
    """CSD written plainly in float64: per channel (z - mean) / sqrt(var + eps), var biased
    (torch.var), over every axis but `channel_dim`; squared difference averaged per layer."""
    def norm(z):
        z = z.double()
        axes = [d for d in range(z.dim()) if d != channel_dim % z.dim()]
        var = torch.var(z, axes, unbiased=False, keepdim=True)
        return (z - z.mean(axes, keepdim=True)) / torch.sqrt(var + eps)
    return sum(((norm(t) - norm(s)) ** 2).mean() for s, t in zip(student, teacher))


def _value_and_grad(loss_fn, z):
    z = z.detach().clone().requires_grad_()
    loss = loss_fn(z)
    loss.backward()
    return loss.detach(), z.grad


def offset_channels(ratio, shape=(8, 4, 6, 6), seed=3):
    """float32 student maps whose channel means are `ratio` times their deviations (deviations
    from 0.01 to 10), and a teacher correlated with them around mean 0."""
    gen = torch.Generator().manual_seed(seed)
    std = torch.tensor([1.0, 0.01, 10.0, 0.5]).view(1, -1, 1, 1)
    noise = torch.randn(shape, generator=gen)
    student = (ratio * std + std * noise).float()
    teacher = (noise + 0.7 * torch.randn(shape, generator=gen)) * 3.0
    return student, teacher


@pytest.mark.parametrize("ratio", [1e3, 1e4])
def test_csd_is_exact_for_channels_whose_mean_dwarfs_their_spread(ratio):
    """float32 loss and gradient against the plain float64 formula on the same values (the
    closed form E[z^2] - mu^2 erred by 4-9% in the gradient at mean/std 1e3)."""
    student, teacher = offset_channels(ratio)
    loss, grad = _value_and_grad(lambda z: csd_loss([z], [teacher]), student)
    ref_loss, ref_grad = _value_and_grad(lambda z: plain_csd([z], [teacher]), student.double())
    assert grad.dtype == torch.float32
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert float(ref_loss) > 0.1
    for channel in range(student.shape[1]):             # each channel against its own scale
        mine, ref = grad[:, channel].double(), ref_grad[:, channel]
        assert float((mine - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), channel


def test_csd_gradient_passes_finite_differences_at_mean_over_std_1e4():
    student, teacher = offset_channels(1e4, shape=(3, 4, 3, 2))
    assert torch.autograd.gradcheck(lambda z: csd_loss([z], [teacher.double()]),
                                    (student.double().requires_grad_(),))


def test_csd_constant_student_channel_has_no_variance():
    """A constant student channel standardizes to zeros: against a N(0, 1) teacher the loss is
    the teacher's var / (var + eps), about 1 (the closed form made it 1.222)."""
    gen = torch.Generator().manual_seed(4)
    teacher = torch.randn(16, 3, 5, 5, generator=gen)
    student = torch.full_like(teacher, 0.0).add_(torch.tensor([3.7, -1e3, 0.1]).view(1, -1, 1, 1))
    loss, grad = _value_and_grad(lambda z: csd_loss([z], [teacher]), student)
    ref_loss, ref_grad = _value_and_grad(lambda z: plain_csd([z], [teacher]), student.double())
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    assert float(ref_loss) == pytest.approx(1.0, abs=1e-3)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5 * float(ref_grad.abs().max()))


def test_csd_gives_a_clamped_channel_no_gradient():
    """Rounding can take an identical pair's per-channel error below zero; the loss clamps it
    to 0, and, as torch.clamp would, passes no gradient through it."""
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(4, 256, 3, 3, generator=gen) * 2 + 1
    x, y = channel_rows(z), channel_rows(z.clone())
    raw = csd_channel_errors(x, y, 1e-5)
    clamped = (raw < 0).flatten()
    assert clamped.any() and not clamped.all()
    _, grad = _value_and_grad(lambda v: csd_loss([v], [z]), z)
    assert torch.all(grad[:, clamped] == 0)
    assert torch.any(grad[:, ~clamped] != 0)


def test_fpq_csd_is_zero_when_student_features_equal_the_teachers_and_positive_after_a_change():
    student = tiny_student(tiny_fp())
    teacher = copy.deepcopy(student)          # same network, so the same conv outputs
    objective = FPQ(student, teacher, FPQConfig(sfp=False)).train()
    assert objective.losses(images(), labels())["csd"].item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        student[2].weight.add_(0.3 * torch.randn_like(student[2].weight))
    base = objective.losses(images(), labels())["csd"].item()
    assert base > 1e-3
    weighted = FPQ(student, teacher, FPQConfig(sfp=False, csd_weight=2.5)).train()
    assert weighted.losses(images(), labels())["csd"].item() == pytest.approx(2.5 * base, rel=1e-6)


def test_csd_gradient_reaches_student_weights_and_step_sizes_never_the_teacher():
    teacher = tiny_fp()
    student = tiny_student(teacher)
    objective = FPQ(student, teacher, FPQConfig(sfp=False)).train()
    assert objective.student_features.names == CONVS
    objective.losses(images(), labels())["csd"].backward()
    layers = dict(quant_layers(student))
    for name in CONVS:
        layer = layers[name]
        for what, param in (("weight", layer.weight),
                            ("weight step", layer.weight_quantizer.scale),
                            ("input step", layer.input_quantizer.scale)):
            assert param.grad is not None and param.grad.abs().sum() > 0, (name, what)
    assert layers["9"].weight.grad is None       # the classifier lies after every CSD layer
    for param in objective.teacher.parameters():
        assert not param.requires_grad and param.grad is None
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())


class OutputRecorder:
    """The output of each named module as the module returned it, by hooks that keep the
    tensor itself (with its graph); only valid on models without in-place ops after them."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        for name in names:
            modules[name].register_forward_hook(
                lambda m, i, o, name=name: self.outputs.__setitem__(name, o))


def without_inplace(model: nn.Module) -> nn.Module:
    """A copy of `model` whose in-place ReLUs write new tensors instead."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model


def squeezenet_fp() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.squeezenet1_1(weights=None, num_classes=10)


@pytest.mark.parametrize("build, size", [(lambda: without_inplace(tiny_fp()), 6),
                                         (squeezenet_fp, 40)])
def test_csd_compares_conv_outputs_even_where_an_inplace_relu_follows(build, size):
    """The captured map is the conv's output, not what the in-place ReLU after it leaves
    (torchvision's SqueezeNet): value and weight gradients equal the plain formula on the
    outputs of the same networks with out-of-place ReLUs."""
    teacher = build()
    for module in teacher.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = True
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(6))
    student = calibrate(quantize_model(teacher, QuantConfig(w_bits=4, a_bits=4)), [x])
    objective = FPQ(student, teacher, FPQConfig(sfp=False)).train()
    names = objective.student_features.names
    torch.manual_seed(8)                       # the same dropout draws in both students
    loss = objective.losses(x, labels(4))["csd"]
    grads = torch.autograd.grad(loss, [m.weight for _, m in quant_layers(student)[:-1]])

    ref_student, ref_teacher = without_inplace(student).train(), without_inplace(teacher).eval()
    seen_s, seen_t = OutputRecorder(ref_student, names), OutputRecorder(ref_teacher, names)
    torch.manual_seed(8)
    ref_student(x)
    with torch.no_grad():
        ref_teacher(x)
    ref = plain_csd([seen_s.outputs[n] for n in names], [seen_t.outputs[n] for n in names])
    ref_grads = torch.autograd.grad(ref, [m.weight for _, m in quant_layers(ref_student)[:-1]])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)
    post_relu = plain_csd([F.relu(seen_s.outputs[n]) for n in names],
                          [F.relu(seen_t.outputs[n]) for n in names])
    assert abs(post_relu.item() - ref.item()) > 1e-2 * ref.item()   # the case is telling
    for mine, want in zip(grads, ref_grads):
        torch.testing.assert_close(mine.double(), want.double(), rtol=1e-3,
                                   atol=1e-4 * float(want.abs().max()))


def tiny_vits() -> list[tuple[str, nn.Module]]:
    torch.manual_seed(0)
    return [("flatq vit_tiny", VisionTransformer(num_classes=10, img_size=8, patch_size=4,
                                                 dim=16, depth=2, heads=2)),
            ("torchvision VisionTransformer", torchvision.models.VisionTransformer(
                image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                mlp_dim=32, num_classes=10))]


@pytest.mark.parametrize("index", [0, 1])
def test_csd_distills_a_transformers_linear_layers_over_batch_and_tokens(index):
    """On a ViT, csd_linear=auto admits every quantized Linear but the classifier; each
    Linear output (batch, tokens, C) is standardized per channel over batch and tokens."""
    what, teacher = tiny_vits()[index]
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    student = calibrate(quantize_model(teacher, QuantConfig(w_bits=4, a_bits=4)), [x])
    # An attention block is not distilled: its output is a tuple, and its out_proj runs as a
    # module in the quantized student only (the float block reads the weight directly).
    attention = [n + "." for n, m in quant_layers(student) if isinstance(m, QuantMultiheadAttention)]
    layers = [(n, m) for n, m in quant_layers(student) if isinstance(m, (QuantConv2d, QuantLinear))
              and not any(n.startswith(a) for a in attention)]
    linears = [n for n, m in layers if isinstance(m, QuantLinear)]
    objective = FPQ(student, teacher, FPQConfig(sfp=False)).train()
    names = objective.student_features.names
    assert names == [n for n, _ in layers[:-1]], what          # conv stem and inner Linears
    assert set(linears) - set(names) == {layers[-1][0]}
    loss = objective.losses(x, labels(6))["csd"]

    seen_s, seen_t = OutputRecorder(student, names), OutputRecorder(teacher, names)
    student(x)
    with torch.no_grad():
        teacher(x)
    ref = sum(plain_csd([seen_s.outputs[n]], [seen_t.outputs[n]],
                        channel_dim=1 if seen_s.outputs[n].dim() == 4 else -1) for n in names)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4), what
    loss.backward()
    first_linear = dict(layers)[names[1]]
    assert first_linear.weight.grad is not None and first_linear.weight.grad.abs().sum() > 0
    # The choices: convs only (the paper), every Linear, and patterns among the candidates.
    choose = lambda **kw: FPQ(student, teacher, FPQConfig(sfp=False, **kw)).student_features.names
    assert choose(csd_linear="none") == [layers[0][0]]
    assert choose(csd_linear="all") == [n for n, _ in layers]
    assert choose(csd_layers=[names[1]]) == [names[1]]
    with pytest.raises(ConfigError, match="CSD layer patterns .* match none"):
        choose(csd_linear="none", csd_layers=[names[1]])


def test_csd_keeps_convs_only_on_a_cnn_by_default():
    student = tiny_student(tiny_fp())
    choose = lambda **kw: FPQ(student, tiny_fp(), FPQConfig(sfp=False, **kw)).student_features.names
    assert choose() == choose(csd_linear="none") == CONVS
    assert choose(csd_linear="all") == CONVS + ["9"]
    assert choose(csd_linear="inner") == CONVS                   # "9" is the classifier
    with pytest.raises(ConfigError, match=r"CSD layer patterns \['9'\] match none"):
        choose(csd_layers=["9"])
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(108, 16), nn.ReLU(), nn.Linear(16, 10))
    mlp_student = calibrate(quantize_model(mlp, QuantConfig(w_bits=4, a_bits=4)), [images(8)])
    with pytest.raises(ConfigError, match="CSD has no layer to distill"):
        FPQ(mlp_student, mlp, FPQConfig(csd_linear="none"))


@pytest.mark.parametrize("config", [FPQConfig(), FPQConfig(p=1.0, sfp_site="before"),
                                    FPQConfig(csd=False)])
def test_fpq_step_runs_the_student_forward_once(config):
    teacher = tiny_fp()
    student = tiny_student(teacher)
    calls = {"student": 0, "teacher": 0}
    student.register_forward_pre_hook(lambda m, i: calls.__setitem__("student", calls["student"] + 1))
    teacher.register_forward_pre_hook(lambda m, i: calls.__setitem__("teacher", calls["teacher"] + 1))
    objective = FPQ(student, teacher, config).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    losses = objective.step(images(), labels(), optimizer)
    assert calls == {"student": 1, "teacher": 1 if config.csd else 0}
    assert set(losses) == ({"ce", "csd"} if config.csd else {"ce"})
    if config.csd:                # forward passes of others (evaluation) capture nothing
        student.eval()(images())
        assert objective.student_features.outputs == {}


# -- KD -------------------------------------------------------------------------------------

def test_kd_loss_matches_a_manual_temperature_scaled_kl():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=gen) * 3, torch.randn(6, 10, generator=gen) * 3
    temp = 4.0
    p_t = torch.exp(t / temp) / torch.exp(t / temp).sum(1, keepdim=True)
    p_s = torch.exp(s / temp) / torch.exp(s / temp).sum(1, keepdim=True)
    manual = temp ** 2 * (p_t * (torch.log(p_t) - torch.log(p_s))).sum(1).mean()
    torch.testing.assert_close(kd_loss(s, t, temp), manual)
    assert float(kd_loss(s, s.clone(), temp)) == pytest.approx(0.0, abs=1e-6)


def _grads(objective, x, y) -> list[torch.Tensor]:
    objective.student.zero_grad(set_to_none=True)
    sum(objective.losses(x, y).values()).backward()
    return [p.grad.clone() for p in objective.student.parameters()]


def test_kd_gradient_differs_from_ce_and_reduces_to_it_at_alpha_zero():
    teacher = tiny_fp(seed=5)
    student = tiny_student(tiny_fp(seed=0))
    x, y = images(), labels()
    ce = _grads(TaskObjective(student).train(), x, y)
    kd = _grads(KD(student, teacher, KDConfig(alpha=0.9, temperature=4.0)).train(), x, y)
    plain = _grads(KD(student, teacher, KDConfig(alpha=0.0)).train(), x, y)
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(ce, kd))
    for a, b in zip(ce, plain):
        torch.testing.assert_close(a, b)


# -- SAM ------------------------------------------------------------------------------------

def _quantizer_params(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}


def test_sam_update_uses_the_gradient_at_the_ascent_point():
    rho, lr = 0.05, 0.1
    student = tiny_student(tiny_fp())
    x, y = images(), labels()
    # By hand, on a copy: g at w; e = rho g / ||g|| on the weights (not on step sizes);
    # the update is w - lr * (gradient of every parameter at w + e).
    ref = copy.deepcopy(student).train()
    params = list(ref.parameters())
    skip = _quantizer_params(ref)
    loss_at_w = F.cross_entropy(ref(x), y)
    grads = torch.autograd.grad(loss_at_w, params, allow_unused=True)
    moved = [(p, g) for p, g in zip(params, grads) if id(p) not in skip and g is not None]
    norm = torch.sqrt(sum((g ** 2).sum() for _, g in moved))
    assert len(moved) < len(params)           # step sizes exist and are left out of the ascent
    with torch.no_grad():
        for p, g in moved:
            p.add_(rho * g / norm)
    grads_at_e = torch.autograd.grad(F.cross_entropy(ref(x), y), params, allow_unused=True)
    assert any(not torch.allclose(a, b) for a, b in zip(grads, grads_at_e) if a is not None)
    expected = [p0.detach() - lr * (g if g is not None else 0)
                for p0, g in zip(student.parameters(), grads_at_e)]
    objective = SAM(student, None, SAMConfig(rho=rho)).train()
    losses = objective.step(x, y, torch.optim.SGD(student.parameters(), lr=lr))
    assert losses["ce"].item() == pytest.approx(loss_at_w.item())   # reported at w
    for got, want in zip(student.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


def test_sam_leaves_the_weights_unperturbed_after_the_step():
    student = tiny_student(tiny_fp())
    before = [p.detach().clone() for p in student.parameters()]
    objective = SAM(student, None, SAMConfig(rho=0.05)).train()
    objective.step(images(), labels(), torch.optim.SGD(student.parameters(), lr=0.0))
    drift = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(student.parameters(), before)))
    assert float(drift) < 1e-3 * 0.05          # the ascent of norm rho was undone


# -- a tiny FPQ run end to end through the CLI ------------------------------------------------

COMMON = ["--data", "synthetic", "--batch-size", "64", "--max-steps-per-epoch", "2",
          "--device", "cpu", "--no-progress", "--test-batch-size", "256"]


def test_fpq_qat_run_trains_end_to_end(fp_run, tmp_path):
    out = tmp_path / "fpq"
    assert flatq_main(["qat", "--from", str(fp_run), "--method", "fpq", "--bits", "w4a4",
                       "--epochs", "2", *COMMON, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "fpq" and summary["bits"] == "w4a4"
    epochs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "test_acc" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(math.isfinite(r["train_ce"]) and r["train_csd"] > 0 for r in epochs)
    model, state = load_model(out)
    assert state["meta"]["quant"]["w_bits"] == 4
    assert {m.bits for _, m in quant_layers(model)} == {(8, 8), (4, 4)}
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == {**config["method"], "name": "fpq", "sfp": True, "csd": True,
                                "p": 0.1, "sfp_site": "after", "csd_weight": 1.0}


@pytest.mark.parametrize("flags, recorded", [
    (["--no-sfp", "--csd-weight", "0.5"], {"sfp": False, "csd": True, "csd_weight": 0.5}),
    (["--no-csd", "--p", "0.3", "--sfp-site", "before"],
     {"csd": False, "sfp": True, "p": 0.3, "sfp_site": "before"}),
])
def test_fpq_ablation_switches_are_accepted_and_recorded(fp_run, tmp_path, flags, recorded):
    out = tmp_path / "ablation"
    assert flatq_main(["qat", "--from", str(fp_run), "--method", "fpq", "--bits", "w2a4",
                       "--epochs", "1", *COMMON, "--max-steps-per-epoch", "1", *flags,
                       "--out", str(out)]) == 0
    method = yaml.safe_load((out / "config.yaml").read_text())["method"]
    assert method["name"] == "fpq"
    assert {k: method[k] for k in recorded} == recorded
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert ("train_csd" in record) == recorded["csd"]


# -- objectives leave the caller's float model as it was ----------------------------------

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
              "_forward_hooks_always_called", "_state_dict_hooks", "_state_dict_pre_hooks",
              "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def hooks_of(model: nn.Module) -> dict:
    return {(name, attr): dict(getattr(module, attr)) for name, module in model.named_modules()
            for attr in HOOK_DICTS}


def snapshot(model: nn.Module) -> dict:
    """Everything an objective could change on a model it was handed: values of parameters
    and buffers, requires_grad flags, every module's training flag, every hook dictionary."""
    return {"tensors": {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()},
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "training": {n: m.training for n, m in model.named_modules()},
            "hooks": hooks_of(model)}


def assert_same(before: dict, after: dict) -> None:
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, value in before["tensors"].items():
        assert torch.equal(after["tensors"][name], value), name


@pytest.mark.parametrize("method", ["lsq", "kd", "sam", "fpq", "cr", "mec", "dnq"])
def test_building_and_running_an_objective_leaves_the_float_model_untouched(method):
    """The FP teacher handed to any objective keeps its values, flags, modes and hooks after
    construction and steps and after close (the `with` block); close also removes every hook
    the objective put on its student."""
    teacher = build_model("resnet8", num_classes=10, in_channels=3).train()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    y = torch.arange(8) % 10
    student = (copy.deepcopy(teacher) if method == "dnq" else
               calibrate(quantize_model(teacher, QuantConfig(w_bits=4, a_bits=4)), [x]))
    options = {"fpq": {"p": 1.0}}.get(method, {})
    before, student_hooks = snapshot(teacher), hooks_of(student)
    with build_objective(method_config(method, options), student, teacher, seed=0) as objective:
        objective.train()
        optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
        for _ in range(2):
            losses = objective.step(x, y, optimizer)
        assert all(torch.isfinite(v) for v in losses.values())
        assert_same(before, snapshot(teacher))
        if method in ("kd", "fpq"):
            assert objective.teacher is not teacher and not objective.teacher.training
    assert_same(before, snapshot(teacher))
    assert hooks_of(student) == student_hooks


def test_methods_with_a_teacher_refuse_to_start_without_one():
    student = tiny_student(tiny_fp())
    for method in (FPQ, KD):
        with pytest.raises(ConfigError, match=f"{method.__name__} needs a teacher model"):
            method(student, None)
