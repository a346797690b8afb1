"""Oscillation dampening (Nagel et al. 2022): the term, its gradient and its schedule against
the formulas written out plainly, and its place in training."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from flatq import calibrate, quantize_model
from flatq.config import DataConfig, QuantConfig, RunConfig, TrainConfig, method_config
from flatq.errors import ConfigError
from flatq.quant.dampening import check_dampening, dampening_loss, dampening_weight
from flatq.runs import load_teacher, pretrain, qat


def quantized_net(**quant) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model = quantize_model(net, QuantConfig(**{"w_bits": 2, "a_bits": 4, "edge_bits": None,
                                               "edge_weights": "learned", **quant}))
    return calibrate(model, [torch.randn(8, 3, 8, 8)])


def reference_term(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int,
                   hi: int) -> torch.Tensor:
    """The paper's term for one layer, written plainly: per weight the bin centre
    s (clamp(round(w / s) + z, lo, hi) - z) minus w clipped to [s (lo - z), s (hi - z)],
    squared, summed over output channels and averaged over the rest."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    s, z = scale.view(shape), zero.view(shape)
    centre = s * (torch.clamp(torch.round(w / s) + z, lo, hi) - z)
    clipped = torch.minimum(torch.maximum(w, s * (lo - z)), s * (hi - z))
    return (centre - clipped).pow(2).sum(0).mean()


def test_the_term_is_the_papers_and_its_gradient_moves_only_weights_toward_bin_centres():
    model = quantized_net()
    with torch.no_grad():                        # some weights outside the grid's range
        model[0].weight[0].mul_(5.0)
    expected = 0.0
    for layer in (model[0], model[3]):
        scale, zero, lo, hi = layer.weight_quantizer.integer_grid()
        expected = expected + reference_term(layer.weight.detach(), scale, zero, lo, hi)
    loss = dampening_loss(model)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    loss.backward()
    conv = model[0]
    # gradient of sum_c mean_rest (t - clip(w))^2: -2 (t - w) / (elements per channel) inside
    # the range, 0 where w is clipped; none reaches step sizes or zero points
    scale, zero, lo, hi = conv.weight_quantizer.integer_grid()
    w = conv.weight.detach()
    s, z = scale.view(-1, 1, 1, 1), zero.view(-1, 1, 1, 1)
    centre = s * (torch.clamp(torch.round(w / s) + z, lo, hi) - z)
    inside = (w >= s * (lo - z)) & (w <= s * (hi - z))
    expected_grad = torch.where(inside, -2 * (centre - w) / w[0].numel(), torch.zeros_like(w))
    torch.testing.assert_close(conv.weight.grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert (~inside).any()
    assert all(p.grad is None or not p.grad.any()
               for p in conv.weight_quantizer.parameters())


def test_a_weight_on_its_bin_centre_costs_nothing():
    model = quantized_net()
    with torch.no_grad():
        for layer in (model[0], model[3]):
            layer.weight.copy_(layer.weight_quantizer(layer.weight))
    assert dampening_loss(model).item() == pytest.approx(0.0, abs=1e-10)


def test_the_weight_is_zero_for_the_first_quarter_then_a_cosine_to_its_final_value():
    assert dampening_weight(0.1, 0.0) == 0.0 and dampening_weight(0.1, 0.24) == 0.0
    assert dampening_weight(0.1, 0.625) == pytest.approx(0.05)       # half way through the ramp
    r = (0.4 - 0.25) / 0.75
    assert dampening_weight(0.1, 0.4) == pytest.approx(0.1 * (1 - math.cos(math.pi * r)) / 2)
    assert dampening_weight(0.1, 1.0) == pytest.approx(0.1)
    assert dampening_weight(0.1, None) == 0.1                         # outside a trainer


def test_dampening_refuses_dorefa_weights_and_float_models():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 3))
    pact = quantize_model(net, QuantConfig(quantizer="pact", pact_weights="dorefa"))
    with pytest.raises(ConfigError, match="DoReFa"):                # the inner conv's weights
        check_dampening(pact)
    with pytest.raises(ConfigError, match="no quantized layer"):
        check_dampening(nn.Linear(3, 3))


def test_qat_with_dampen_logs_the_term_and_pretrain_refuses_it(tmp_path):
    train = dict(epochs=2, batch_size=64, lr=0.05, device="cpu", progress=False,
                 max_steps_per_epoch=3)
    data = DataConfig(name="synthetic")
    pretrain(RunConfig(model="resnet8", data=data, method=method_config("ce"),
                       train=TrainConfig(**train)), tmp_path / "fp")
    qat(RunConfig(model="resnet8", data=data, method=method_config("lsq"),
                  quant=QuantConfig(w_bits=2, a_bits=4),
                  train=TrainConfig(**train, dampen=0.1)),
        *load_teacher(tmp_path / "fp"), tmp_path / "q")
    lines = (tmp_path / "q" / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines]
    dampen = [e["train_dampen"] for e in epochs if "train_dampen" in e]
    assert len(dampen) == 2 and dampen[0] < dampen[1]    # the weight ramps up over training
    with pytest.raises(ConfigError, match="no quantized layer"):
        pretrain(RunConfig(model="resnet8", data=data, method=method_config("ce"),
                           train=TrainConfig(**train, dampen=0.1)), tmp_path / "fp2")
    assert not (tmp_path / "fp2").exists()
