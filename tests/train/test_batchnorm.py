"""Re-estimating BatchNorm statistics after QAT (flatq.train.batchnorm; the qat() option
quant.bn_images and quant.bn_check are tested in test_train.py with its shared runs).

The reference is the definition written out here: each channel's running mean is the average of
the per-batch means of the BatchNorm's input, its running variance the average of the per-batch
unbiased variances (PyTorch's cumulative moving average with momentum=None).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import flatq.methods  # noqa: F401  (registers the method configs)
from flatq import calibrate, quantize_model
from flatq.config import QuantConfig
from flatq.methods.sfp import StochasticFeaturePerturbation
from flatq.data import calibration_batches, subset_batches
from flatq.data.datasets import ImageTensorDataset
from flatq.errors import ConfigError
from flatq.data.transforms import BatchPipeline
from flatq.train.batchnorm import accuracy_on, reestimate_batchnorm, reestimate_batchnorm_checked


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


def normalized_argmax(mean: float, var: float) -> nn.Module:
    """Predicts the larger of two normalized features: right only with the data's statistics."""
    norm = nn.BatchNorm1d(2, affine=False)
    with torch.no_grad():
        norm.running_mean.fill_(mean)
        norm.running_var.fill_(var)
    return nn.Sequential(norm)


def two_feature_data(shift: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features 10 + noise / shift + noise; the label is the one with the larger noise."""
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(seed))
    return noise + torch.tensor([10.0, shift]), noise.argmax(1)


def test_checked_reestimation_keeps_statistics_that_help_on_the_check_images():
    model = normalized_argmax(mean=0.0, var=1.0)        # stale: predicts class 0 everywhere
    images, labels = two_feature_data(shift=0.0, seed=1)
    estimate = [two_feature_data(shift=0.0, seed=2)[0]]
    result = reestimate_batchnorm_checked(model, estimate, lambda: [(images, labels)])
    assert result.kept and result.after > 90 > 60 > result.before
    assert result.before == accuracy_on(normalized_argmax(0.0, 1.0), [(images, labels)])
    torch.testing.assert_close(model[0].running_mean, estimate[0].mean(0))


def test_checked_reestimation_restores_statistics_that_hurt_exactly():
    model = normalized_argmax(mean=0.0, var=1.0)
    with torch.no_grad():
        model[0].running_mean.copy_(torch.tensor([10.0, 0.0]))    # the data's own statistics
    before = copy.deepcopy(model.state_dict())
    images, labels = two_feature_data(shift=0.0, seed=1)
    wrong = [two_feature_data(shift=0.0, seed=2)[0] * torch.tensor([1.0, 0.1])]
    result = reestimate_batchnorm_checked(model, wrong, lambda: [(images, labels)])
    assert not result.kept and result.after < result.before
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training            # its mode as before (a new module trains)


def test_subset_batches_after_the_calibration_subset_do_not_overlap_it():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 3, 2, 2)
    dataset = ImageTensorDataset(images.contiguous(), torch.arange(40), 40, "tiny")
    pipeline = BatchPipeline((0.0,) * 3, (1.0,) * 3)     # pixels / 255: the index / 255
    first = calibration_batches(dataset, pipeline, 12, seed=5, batch_size=5)
    held = list(subset_batches(dataset, pipeline, 20, seed=5, skip=12, batch_size=7))
    labels = torch.cat([batch_labels for _, batch_labels in held])
    assert [len(b) for b, _ in held] == [7, 7, 6] and len(set(labels.tolist())) == 20
    seen = {round(float(v) * 255) for batch in first for v in batch[:, 0, 0, 0]}
    held_images = {round(float(v) * 255) for batch, _ in held for v in batch[:, 0, 0, 0]}
    assert len(seen) == 12 and held_images == set(labels.tolist())
    assert not seen & held_images
    with pytest.raises(ConfigError, match="21 training images requested after the first 20"):
        subset_batches(dataset, pipeline, 21, seed=5, skip=20)      # refused before reading
