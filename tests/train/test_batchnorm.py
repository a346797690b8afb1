"""Re-estimating BatchNorm statistics after QAT (flatq.train.batchnorm; the qat() option
quant.bn_images is tested in test_train.py with its shared runs).

The reference is the definition written out here: each channel's running mean is the average of
the per-batch means of the BatchNorm's input, its running variance the average of the per-batch
unbiased variances (PyTorch's cumulative moving average with momentum=None).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import flatq.methods  # noqa: F401  (registers the method configs)
from flatq import calibrate, quantize_model
from flatq.config import QuantConfig
from flatq.methods.sfp import StochasticFeaturePerturbation
from flatq.train.batchnorm import reestimate_batchnorm


def quantized_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    model = quantize_model(net, QuantConfig(w_bits=4, a_bits=4))
    calibrate(model, [torch.randn(8, 3, 8, 8)])
    return model


def test_running_statistics_are_the_average_over_the_batches_and_nothing_else_changes():
    model = quantized_net().train()
    norm = model[1]
    with torch.no_grad():
        norm.running_mean.fill_(5.0)
        norm.running_var.fill_(7.0)
    before = copy.deepcopy(model.state_dict())
    batches = [torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    # What the BatchNorm sees: the first quantized conv's output (eval mode: no SFP, same ranges).
    with torch.no_grad():
        inputs = [model.eval()[0](b) for b in batches]
    model.train()
    sfp = StochasticFeaturePerturbation(model, p=1.0)   # must not fire: quant layers stay in eval
    assert reestimate_batchnorm(model, batches) == 2
    sfp.remove()
    assert sum(sfp.calls.values()) == 0          # SFP counts only training-mode passes
    means = torch.stack([z.mean(dim=(0, 2, 3)) for z in inputs]).mean(0)
    variances = torch.stack([z.var(dim=(0, 2, 3), unbiased=True) for z in inputs]).mean(0)
    torch.testing.assert_close(norm.running_mean, means)
    torch.testing.assert_close(norm.running_var, variances)
    assert int(norm.num_batches_tracked) == 2 and norm.momentum == 0.1
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    changed = {k for k in before if isinstance(before[k], torch.Tensor)
               and not torch.equal(before[k], after[k])}
    assert changed == {f"{i}.{s}" for i in (1, 4)
                       for s in ("running_mean", "running_var", "num_batches_tracked")}


def test_a_model_without_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Linear(3, 2))
    assert reestimate_batchnorm(model, [torch.randn(4, 3)]) == 0
