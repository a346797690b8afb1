"""Iterative freezing of oscillating weights (Nagel et al. 2022): the oscillation count and its
moving averages against sequences worked out by hand, the threshold's schedule, pinning to the
frozen integer under a moving grid, and its place in training (resume, refusals)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from flatq import calibrate, quantize_model
from flatq.config import DataConfig, QuantConfig, RunConfig, TrainConfig, method_config
from flatq.errors import ConfigError
from flatq.quant.freezing import (OscillationTracker, WeightFreezing, freezing_threshold,
                                  weight_integers)
from flatq.runs import load_model, load_teacher, pretrain, qat
from flatq.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from run_helpers import Interrupted, interrupt_at


def test_an_oscillation_is_a_change_against_the_previous_change():
    """One element through 0, 1, 0, 1, 1, 2 (momentum 0.5): the change up at step 1 has no
    earlier change, down at 2 and up at 3 each reverse the last one, 1 -> 1 changes nothing,
    1 -> 2 goes the same way as the last change (up)."""
    tracker = OscillationTracker(torch.tensor([0.0]))
    expected_frequency, frequency = [], 0.0
    for value, oscillated in [(1, 0), (0, 1), (1, 1), (1, 0), (2, 0)]:
        tracker.update(torch.tensor([float(value)]), momentum=0.5, threshold=1.0)
        frequency = 0.5 * frequency + 0.5 * oscillated
        expected_frequency.append(frequency)
        assert tracker.frequency.item() == pytest.approx(frequency)
    assert expected_frequency == [0.0, 0.5, 0.75, 0.375, 0.1875]
    # the integers' moving average: 0 -> 0.5 -> 0.25 -> 0.625 -> 0.8125 -> 1.40625
    assert tracker.mean.item() == pytest.approx(1.40625)
    assert not tracker.frozen.any()


def test_a_weight_freezes_above_the_threshold_to_its_rounded_mean_integer():
    tracker = OscillationTracker(torch.tensor([0.0, 0.0]))
    # element 0 oscillates 0/1, element 1 climbs steadily and never oscillates
    for first, second in [(1, 1), (0, 2), (1, 3)]:
        tracker.update(torch.tensor([float(first), float(second)]), momentum=0.5,
                       threshold=0.6)
    # after step 3 element 0's frequency is 0.75 > 0.6; its mean before that step was 0.25
    assert tracker.frozen.tolist() == [True, False]
    assert tracker.frozen_integers[0].item() == 0.0
    tracker.update(torch.tensor([1.0, 4.0]), momentum=0.5, threshold=0.0)
    assert tracker.frozen_integers[0].item() == 0.0       # frozen once, for good


def test_the_threshold_holds_then_follows_a_cosine_to_its_final_value():
    assert freezing_threshold(0.02, 0.0) == 0.1 and freezing_threshold(0.02, 0.24) == 0.1
    assert freezing_threshold(0.02, 0.625) == pytest.approx(0.06)    # half way
    r = (0.4 - 0.25) / 0.75
    assert freezing_threshold(0.02, 0.4) == pytest.approx(
        0.02 + 0.08 * (1 + math.cos(math.pi * r)) / 2)
    assert freezing_threshold(0.02, 1.0) == pytest.approx(0.02)


def quantized_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model = quantize_model(net, QuantConfig(w_bits=2, a_bits=4, edge_bits=None,
                                            edge_weights="learned"))
    return calibrate(model, [torch.randn(8, 3, 8, 8)])


def test_a_frozen_weight_keeps_its_integer_through_weight_and_step_size_updates():
    model = quantized_net()
    conv = model[0]
    freezing = WeightFreezing(model, final_threshold=0.3, momentum=0.5)
    scales = conv.weight_quantizer.scale.detach().clone()
    _, zero_point, lo, hi = conv.weight_quantizer.integer_grid()
    with torch.no_grad():                   # element [0, 0, 0, 0] one level below the top
        conv.weight[0, 0, 0, 0] = (hi - 1 - zero_point[0]) * scales[0]
    start = weight_integers(conv)[0, 0, 0, 0].item()
    assert start == hi - 1
    # push it back and forth across a rounding threshold (progress 1.0: the threshold is the
    # final 0.3): up (no earlier change), down (an oscillation: frequency 0.5, frozen), ...
    for shift in (1, -1, 1, -1):
        with torch.no_grad():
            conv.weight[0, 0, 0, 0] += shift * scales[0]
        freezing.update(1.0)
    tracker = freezing.trackers["0"]
    assert tracker.frozen[0, 0, 0, 0] and tracker.frozen.sum() == 1
    frozen_integer = tracker.frozen_integers[0, 0, 0, 0].item()
    assert frozen_integer in (start, start + 1)
    # the optimizer moves the weight far away and the step size changes: after the update the
    # quantizer itself gives the frozen integer again, at the bin's centre, other weights free
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] -= 10 * scales[0]
        conv.weight[1, 0, 0, 0] += 10 * scales[1]
        conv.weight_quantizer.scale.mul_(1.3)
    freezing.update(1.0)
    integers = weight_integers(conv)
    assert integers[0, 0, 0, 0].item() == frozen_integer
    assert integers[1, 0, 0, 0].item() == hi                # moved freely to the grid's top
    new_scale = conv.weight_quantizer.scale.detach()[0]
    centre = (frozen_integer - zero_point[0].item()) * new_scale
    assert conv.weight[0, 0, 0, 0].item() == pytest.approx(centre.item())
    assert conv.weight_quantizer(conv.weight)[0, 0, 0, 0].item() == pytest.approx(centre.item())
    assert freezing.frozen_count() == (1, conv.weight.numel() + model[3].weight.numel())


def test_freezing_refuses_models_without_narrow_learned_weights():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    eight = calibrate(quantize_model(net, QuantConfig(w_bits=8, a_bits=8, edge_bits=None)),
                      [torch.randn(8, 3, 8, 8)])
    with pytest.raises(ConfigError, match="at most 4 bits on a learned grid"):
        WeightFreezing(eight, 0.02, 0.01)
    with pytest.raises(ConfigError, match="at most 4 bits on a learned grid"):
        WeightFreezing(nn.Linear(3, 3), 0.02, 0.01)


def train_config(**changes) -> TrainConfig:
    values = dict(epochs=2, batch_size=64, lr=0.05, device="cpu", progress=False,
                  max_steps_per_epoch=3, track_every=1)
    return TrainConfig(**{**values, **changes})


def qat_config(method: str = "lsq", **train) -> RunConfig:
    # a threshold of 0 freezes every weight that oscillates once: something to resume
    return RunConfig(model="resnet8", data=DataConfig(name="synthetic"),
                     method=method_config(method), quant=QuantConfig(w_bits=2, a_bits=2),
                     train=train_config(freeze_oscillations=1e-9, freeze_momentum=0.5, **train))


def test_qat_counts_frozen_weights_and_resumes_them_exactly_mid_run(fp_run, tmp_path):
    config = qat_config(checkpoint_every_steps=2, lr=0.5)
    qat(config, *load_teacher(fp_run), tmp_path / "whole")
    with pytest.raises(Interrupted):
        qat(config, *load_teacher(fp_run), tmp_path / "cut", callbacks=[interrupt_at(5)])
    state = load_checkpoint(tmp_path / "cut", CHECKPOINT_NAME)
    assert state["step"] == 4
    assert any(tracker["frozen"].any() for tracker in state["freezing"].values())
    qat(config, *load_teacher(fp_run), tmp_path / "cut", resume=True)
    whole, cut = load_model(tmp_path / "whole")[0], load_model(tmp_path / "cut")[0]
    for (key, a), b in zip(whole.state_dict().items(), cut.state_dict().values()):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, key
    whole, cut = (json.loads((tmp_path / run / "summary.json").read_text())
                  for run in ("whole", "cut"))
    assert whole["frozen_weights"] > 0 and 0 < whole["frozen_share"] < 1
    assert cut["frozen_weights"] == whole["frozen_weights"]


def test_freezing_works_under_sam_and_refuses_float_training(fp_run, tmp_path):
    qat(qat_config("sam"), *load_teacher(fp_run), tmp_path / "sam")
    summary = json.loads((tmp_path / "sam" / "summary.json").read_text())
    assert summary["frozen_weights"] > 0
    with pytest.raises(ConfigError, match="at most 4 bits on a learned grid"):
        pretrain(RunConfig(model="resnet8", data=DataConfig(name="synthetic"),
                           method=method_config("ce"),
                           train=train_config(freeze_oscillations=0.02)), tmp_path / "fp2")
    assert not (tmp_path / "fp2").exists()
