"""torch.export and torch.compile(fullgraph=True) of a quantized model: no graph break, the
eager outputs, and the eager LSQ gradients in a training step."""

import copy

import pytest
import torch
from torch import nn

from flatq import QuantConfig, calibrate, quantize_model
from flatq.models import build_model


def quantized_resnet8(quantizer: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model, x = build_model("resnet8"), torch.randn(8, 3, 32, 32)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:   # running statistics = the batch's, so that the calibrated ranges also
        bn.momentum = None  # fit the training-mode activations (no all-clipped, zero gradient)
    with torch.no_grad():
        model(x)
    for bn in norms:
        bn.momentum = 0.1
    model = calibrate(quantize_model(model.eval(), QuantConfig(quantizer=quantizer)), [x])
    return model, x, torch.randint(0, 10, (8,))


def exported(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return torch.export.export(model, (x,)).module()


def compiled(model: nn.Module, x: torch.Tensor) -> nn.Module:
    return torch.compile(model, fullgraph=True, backend="aot_eager")


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, dict]:
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    module = getattr(model, "_orig_mod", model)    # torch.compile's wrapper holds the module
    return loss.item(), {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("convert", [exported, compiled])
def test_eval_matches_eager(convert):
    model, x, _ = quantized_resnet8("lsq")
    model.eval()
    with torch.no_grad():
        ref = model(x)
        out = convert(model, x)(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("quantizer", ["lsq", "lsq+"])
@pytest.mark.parametrize("convert", [exported, compiled])
def test_training_step_matches_eager(convert, quantizer):
    model, x, y = quantized_resnet8(quantizer)
    model.train()
    twin = copy.deepcopy(model)
    loss, grads = step(model, x, y)
    twin_loss, twin_grads = step(convert(twin, x), x, y)
    assert twin_loss == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == twin_grads.keys()
    # The LSQ backward survives: step sizes get the same, mostly non-zero, gradients as in
    # eager (differentiating round() instead would give zeros).
    scales = [g for n, g in grads.items() if n.endswith("scale")]
    assert sum(bool(g.abs().sum() > 0) for g in scales) > len(scales) / 2
    for name, grad in grads.items():
        torch.testing.assert_close(twin_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
