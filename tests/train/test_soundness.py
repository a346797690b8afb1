"""QAT's soundness options (issue 24): dead weight channels are counted and warned about, the
quantizers' learning rate is their own, and BatchNorm statistics freeze for the end of training
without touching quantizer ranges and resume exactly mid-run."""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

import pytest
import torch
from torch import nn

from flatq import calibrate, quantize_model
from flatq.config import DataConfig, QuantConfig, RunConfig, TrainConfig, method_config
from flatq.data import calibration_batches, prepare_data
from flatq.quant import quant_layers
from flatq.quant.health import count_dead, dead_channels
from flatq.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from flatq.train.batchnorm import reestimate_batchnorm
from flatq.train.optim import build_optimizer
from flatq.runs import load_model, load_teacher, pretrain, qat
from run_helpers import Interrupted, interrupt_at


def small_quantized_net(w_bits: int = 4) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 3))
    model = quantize_model(net, QuantConfig(w_bits=w_bits, a_bits=4, edge_bits=None,
                                            edge_weights="learned"))
    calibrate(model, [torch.randn(8, 3, 8, 8)])
    return model


def test_a_channel_is_dead_exactly_when_all_its_weights_quantize_to_zero():
    model = small_quantized_net()
    conv = model[0]
    assert dead_channels(model) == {}
    weight_max = conv.weight.detach().flatten(1).abs().amax(1)
    with torch.no_grad():
        # LSQ's symmetric-free grid: a step just above twice a channel's largest |w| rounds
        # every weight of it to the zero point; just below, its largest weight survives.
        scale = conv.weight_quantizer.scale
        scale[2] = 2.01 * weight_max[2]
        scale[1] = 1.9 * weight_max[1]
    reference = conv.weight_quantizer(conv.weight).detach()
    assert (reference[2] == 0).all() and (reference[1] != 0).any()
    assert dead_channels(model) == {"0": [2]} and count_dead(dead_channels(model)) == 1


def test_quantizer_parameters_learn_at_their_own_multiple_of_the_rate():
    model = small_quantized_net()
    config = TrainConfig(lr=0.1, quantizer_lr=0.01, momentum=0.0, weight_decay=0.0)
    optimizer = build_optimizer(model, config)
    scale, weight = model[0].weight_quantizer.scale, model[0].weight
    model(torch.randn(8, 3, 8, 8)).square().mean().backward()
    expected_scale = scale.detach() - 0.1 * 0.01 * scale.grad
    expected_weight = weight.detach() - 0.1 * weight.grad
    optimizer.step()
    torch.testing.assert_close(scale.detach(), expected_scale)
    torch.testing.assert_close(weight.detach(), expected_weight)
    rates = sorted(group["lr"] for group in optimizer.param_groups)
    assert rates == [0.1 * 0.01, 0.1]


def test_at_multiple_one_the_groups_are_the_earlier_two():
    """Checkpoints from before the option resume: weights (decayed) first, ranges second."""
    groups = build_optimizer(small_quantized_net(), TrainConfig()).param_groups
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("soundness") / "fp"
    pretrain(RunConfig(model="resnet8", data=DataConfig(name="synthetic"),
                       method=method_config("ce"), train=train_config(epochs=1)), out)
    return out


def train_config(**changes) -> TrainConfig:
    values = dict(epochs=2, batch_size=64, lr=0.05, device="cpu", progress=False,
                  max_steps_per_epoch=3, track_every=1)
    return TrainConfig(**{**values, **changes})


def qat_config(quant: dict | None = None, **train) -> RunConfig:
    return RunConfig(model="resnet8", data=DataConfig(name="synthetic"),
                     method=method_config("lsq"),
                     quant=QuantConfig(**{"w_bits": 2, "a_bits": 4, **(quant or {})}),
                     train=train_config(**train))


def norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_frozen_batchnorm_keeps_its_statistics_and_leaves_quantizers_training(teacher, tmp_path):
    seen = []

    def record(step, objective, images, labels):
        student = objective.student
        seen.append((step, [n.running_mean.clone() for n in norms(student)],
                     all(not n.training for n in norms(student)),
                     all(q.training for _, layer in quant_layers(student)
                         for q in (layer.weight_quantizer, layer.input_quantizer))))

    config = qat_config(bn_freeze=0.5)
    config.quant.bn_images = 0      # frozen as trained (re-estimation at the freeze: below)
    qat(config, *load_teacher(teacher), tmp_path / "run", callbacks=[record])
    # 6 steps, frozen from step 3 on: the callback after step s sees steps 1..s done
    frozen = {step: means for step, means, bn_eval, _ in seen if step >= 4}
    assert [step for step, *_ in seen] == [1, 2, 3, 4, 5, 6]
    assert all(bn_eval for step, _, bn_eval, _ in seen if step >= 4)
    assert not any(bn_eval for step, _, bn_eval, _ in seen if step <= 3)
    assert all(quantizers_training for *_, quantizers_training in seen)
    at_freeze = dict((step, means) for step, means, *_ in seen)[3]
    for means in frozen.values():
        assert all(torch.equal(a, b) for a, b in zip(means, at_freeze))


def test_batchnorm_freezes_with_statistics_re_estimated_on_the_weights_of_that_step(
        teacher, tmp_path):
    config = qat_config(bn_freeze=0.5)
    config.quant.bn_images = 96
    data = prepare_data(config.data)
    expected, seen = {}, {}

    def record(step, objective, images, labels):
        if step == 3:        # the freeze comes before step 4: re-estimate a copy independently
            copy = deepcopy(objective.student)
            reestimate_batchnorm(copy, calibration_batches(data.train, data.eval_pipeline, 96,
                                                           config.quant.calib_seed, 64))
            expected["means"] = [n.running_mean.clone() for n in norms(copy)]
            expected["running"] = [n.running_mean.clone() for n in norms(objective.student)]
        seen[step] = [n.running_mean.clone() for n in norms(objective.student)]

    qat(config, *load_teacher(teacher), tmp_path / "run", callbacks=[record])
    for step in (4, 5, 6):
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(seen[step], expected["means"]))
    assert not all(torch.allclose(a, b, atol=1e-3)
                   for a, b in zip(expected["running"], expected["means"]))


@pytest.mark.parametrize("bn_images", [0, 96])
def test_frozen_batchnorm_resumes_exactly_mid_run(bn_images, teacher, tmp_path):
    config = qat_config(bn_freeze=0.5, checkpoint_every_steps=2)
    config.quant.bn_images = bn_images
    qat(config, *load_teacher(teacher), tmp_path / "whole")
    with pytest.raises(Interrupted):
        qat(config, *load_teacher(teacher), tmp_path / "cut", callbacks=[interrupt_at(5)])
    assert load_checkpoint(tmp_path / "cut", CHECKPOINT_NAME)["step"] == 4   # frozen already
    qat(config, *load_teacher(teacher), tmp_path / "cut", resume=True)
    whole, cut = load_model(tmp_path / "whole")[0], load_model(tmp_path / "cut")[0]
    for (key, a), b in zip(whole.state_dict().items(), cut.state_dict().values()):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, key


def test_qat_warns_when_a_channel_dies_and_the_summary_counts_it(teacher, tmp_path, capsys):
    def kill_stem_channel(step, objective, images, labels):
        if step == 1:
            stem = quant_layers(objective.student)[0][1]
            with torch.no_grad():
                stem.weight_quantizer.scale[0] = 1e3 * stem.weight.abs().max()

    learned = {"edge_weights": "learned", "edge_init": "lsq"}   # a step size to throw, no other
    qat(qat_config(learned), *load_teacher(teacher), tmp_path / "run",  # channel dying
        callbacks=[kill_stem_channel])
    err = capsys.readouterr().err
    assert err.count("warning: 1 weight channel(s) dead") == 1      # once, when it died
    assert "stem.0 [0]" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dead_channels"] == 1 and summary["dead_channel_layers"] == {"stem.0": [0]}


@pytest.mark.parametrize("edges", [{}, {"edge_weights": "learned", "edge_init": "lsq"}],
                         ids=["default-minmax-edges", "learned-lsq-init"])
def test_the_stem_stays_alive_where_a_min_max_initialized_step_dies(edges, teacher, tmp_path,
                                                                    capsys):
    """The synthetic case of docs/soundness.md at W2A4 (lr 0.1: at 0.05 whether a channel dies
    within six steps depended on the thread count): a learned 8-bit stem step initialized from
    min-max is overshot to its clamp and thrown above the weights; min-max edge weights (the
    default) or LSQ's own initial step keep every channel."""
    qat(qat_config({"edge_weights": "learned", "edge_init": "minmax"}, lr=0.1),
        *load_teacher(teacher), tmp_path / "minmax")
    assert "warning:" in capsys.readouterr().err
    dead = json.loads((tmp_path / "minmax" / "summary.json").read_text())["dead_channels"]
    assert dead > 0
    qat(qat_config(edges, lr=0.1), *load_teacher(teacher), tmp_path / "fixed")
    assert "dead" not in capsys.readouterr().err
    summary = json.loads((tmp_path / "fixed" / "summary.json").read_text())
    assert summary["dead_channels"] == 0 and summary["dead_channel_layers"] == {}


def test_inner_8_bit_weights_stay_alive_where_learned_min_max_initialized_steps_die(
        teacher, tmp_path, capsys):
    """The same overshoot by bit width, not position: at W8A8 the inner layers' learned steps
    start at range / 255 too, and within six steps some are thrown above their weights;
    min-max 8-bit weights (the default) keep every channel."""
    w8a8 = {"w_bits": 8, "a_bits": 8}
    qat(qat_config({**w8a8, "eight_bit_weights": "learned"}, lr=0.1), *load_teacher(teacher),
        tmp_path / "learned")
    summary = json.loads((tmp_path / "learned" / "summary.json").read_text())
    assert summary["dead_channels"] > 0
    assert set(summary["dead_channel_layers"]) - {"stem.0", "linear"}     # inner layers died
    capsys.readouterr()
    qat(qat_config(w8a8, lr=0.1), *load_teacher(teacher), tmp_path / "minmax")
    assert "dead" not in capsys.readouterr().err
    assert json.loads((tmp_path / "minmax" / "summary.json").read_text())["dead_channels"] == 0

