"""DNQ (noise-driven pre-conditioning) and post-training quantization: the injected noise
against its closed form, the update against a hand-made SGD step, the range methods against
torch's own quantile and fake-quant ops, and the `flatq ptq` / `flatq pretrain --method dnq`
commands end to end on synthetic data."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from flatq import QuantConfig
from flatq.cli import main
from flatq.config import DataConfig
from flatq.data import calibration_batches
from flatq.errors import ConfigError
from flatq.methods import DNQ, PRETRAIN_METHODS, DNQConfig
from flatq.models import build_model
from flatq.quant import MinMaxQuantizer, named_quantizers, quant_layers
from flatq.quant.observers import PercentileObserver, make_observer
from flatq.quant.ptq import post_training_quantize
from flatq.quant.quantizers import range_to_affine
from flatq.train.checkpoint import load_checkpoint
from flatq.train.loop import evaluate
from flatq.runs import load_model, prepare_data


def float_layers(model):
    return [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def expected_sigma(weight, bits):
    """s / sqrt(12) per output channel, s = (max - min) / (2^q - 1): methods.md, section 4."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    assert (flat.min(1).values < 0).all() and (flat.max(1).values > 0).all()
    return (flat.max(1).values - flat.min(1).values) / (2 ** bits - 1) / math.sqrt(12)


def capture_weights(model):
    """Forward pre-hooks recording every layer's weight as the forward pass sees it."""
    seen, handles = {}, []
    for name, layer in float_layers(model):
        handles.append(layer.register_forward_pre_hook(
            lambda m, inputs, name=name: seen.__setitem__(name, m.weight.detach().clone())))
    return seen, handles


def resnet8(seed=0):
    torch.manual_seed(seed)
    return build_model("resnet8", num_classes=10, in_channels=3)


def batch(n=4, size=16, seed=1):
    """Small images keep the tests fast (the ResNets pool globally: any size works)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


# -- weight noise ---------------------------------------------------------------------------

def test_weight_noise_std_per_layer_follows_target_and_edge_bits():
    model = resnet8()
    dnq = DNQ(model, config=DNQConfig(target_bits="w4a4", act_noise=False), seed=0)
    clean = {n: m.weight.detach().clone() for n, m in float_layers(model)}
    seen, handles = capture_weights(model)
    dnq.step(*batch(), torch.optim.SGD(model.parameters(), lr=0.0))
    names = list(clean)
    for name in names:
        bits = 8 if name in (names[0], names[-1]) else 4   # first/last layer at 8 bits
        z = (seen[name] - clean[name]).reshape(clean[name].shape[0], -1)
        z = z / expected_sigma(clean[name], bits)[:, None]
        tol = 5 / math.sqrt(2 * z.numel())                   # 5 standard errors of a std
        assert abs(z.std().item() - 1) < tol, (name, z.std().item())
        assert abs(z.mean().item()) < 5 / math.sqrt(z.numel()), name
    for h in handles:
        h.remove()


def test_weight_noise_std_per_channel_matches_step_over_sqrt12():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4096, 8), nn.ReLU(), nn.Linear(8, 10))
    with torch.no_grad():   # channels of very different ranges: the noise must follow each
        model[1].weight.mul_(torch.logspace(-2, 1, 8)[:, None])
    dnq = DNQ(model, config=DNQConfig(target_bits="w2a4", edge_bits=None, act_noise=False),
              seed=3)
    clean = model[1].weight.detach().clone()
    seen, _ = capture_weights(model)
    dnq.step(torch.randn(4, 4096), torch.randint(0, 10, (4,)),
             torch.optim.SGD(model.parameters(), lr=0.0))
    measured = (seen["1"] - clean).std(dim=1)
    ratio = measured / expected_sigma(clean, 2)
    assert torch.allclose(ratio, torch.ones(8), atol=5 / math.sqrt(2 * 4096)), ratio


def test_stored_weights_are_clean_and_updated_with_the_noisy_gradient():
    model = resnet8()
    reference = copy.deepcopy(model)
    images, labels = batch()
    dnq = DNQ(model, config=DNQConfig(target_bits="w2a4", act_noise=False), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen, _ = capture_weights(model)
    lr = 0.1
    dnq.step(images, labels, torch.optim.SGD(model.parameters(), lr=lr))
    # The reference: the same network at the noisy weights, plain autograd, SGD by hand.
    with torch.no_grad():
        for n, m in float_layers(reference):
            assert (seen[n] - m.weight).abs().max() > 1e-4   # the forward did see noise
            m.weight.copy_(seen[n])
    nn.functional.cross_entropy(reference.train()(images), labels).backward()
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for n, p in model.named_parameters():
        assert torch.allclose(p, before[n] - lr * grads[n], atol=1e-6, rtol=0), n


def test_weights_restored_bit_for_bit_with_zero_learning_rate():
    model = resnet8()
    dnq = DNQ(model, config=DNQConfig(target_bits="w2a4"), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dnq.step(*batch(), torch.optim.SGD(model.parameters(), lr=0.0))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# -- activation noise -----------------------------------------------------------------------

def test_activation_noise_frequency_matches_p_and_is_absent_in_eval():
    model = resnet8()
    p = 0.3
    dnq = DNQ(model, config=DNQConfig(act_noise_p=p, weight_noise=False), seed=5)
    x = batch(n=2, size=8)[0]
    model.train()
    forwards = 100
    with torch.no_grad():
        for _ in range(forwards):
            model(x)
    trials = sum(dnq.calls.values())
    assert set(dnq.calls.values()) == {forwards}
    rate = sum(dnq.fired.values()) / trials
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / trials), rate
    dnq.close()
    model.eval()
    with torch.no_grad():
        reference = model(x)
    dnq = DNQ(model, config=DNQConfig(act_noise_p=1.0, weight_noise=False), seed=5)
    with torch.no_grad():
        assert torch.equal(model(x), reference)
    assert sum(dnq.calls.values()) == 0


def test_activation_noise_std_and_input_range_ema():
    model = resnet8()
    name, layer = float_layers(model)[3]
    clean_inputs, noisy_inputs = [], []
    layer.register_forward_pre_hook(lambda m, i: clean_inputs.append(i[0].detach().clone()))
    dnq = DNQ(model, config=DNQConfig(target_bits="w4a2", act_noise_p=1.0, act_momentum=0.25,
                                      weight_noise=False), seed=0)
    layer.register_forward_pre_hook(lambda m, i: noisy_inputs.append(i[0].detach().clone()))
    model.train()
    with torch.no_grad():
        model(batch(n=8)[0])
        model(batch(n=8, seed=2)[0] * 3)
    raw = [torch.stack([x.min(), x.max()]) for x in clean_inputs]
    ema = raw[0] + 0.25 * (raw[1] - raw[0])
    assert torch.allclose(dnq.input_ranges[name], ema)
    for (lo, hi), clean, noisy in zip((raw[0], ema), clean_inputs, noisy_inputs):
        step = (hi.clamp(min=0) - lo.clamp(max=0)) / (2 ** 2 - 1)   # 2-bit inputs
        measured = (noisy - clean).std()
        assert abs(measured / (step / math.sqrt(12)) - 1) < 5 / math.sqrt(2 * clean.numel())


def test_noise_state_round_trip_reproduces_the_step():
    a, b = resnet8(), resnet8()
    dnq_a = DNQ(a, config=DNQConfig(target_bits="w4a4"), seed=11)
    dnq_b = DNQ(b, config=DNQConfig(target_bits="w4a4"), seed=99)
    images, labels = batch()
    dnq_a.step(images, labels, torch.optim.SGD(a.parameters(), lr=0.0))   # fills input ranges
    b.load_state_dict(a.state_dict())
    dnq_b.load_state_dict(dnq_a.state_dict())
    for model, dnq in ((a, dnq_a), (b, dnq_b)):
        dnq.step(images, labels, torch.optim.SGD(model.parameters(), lr=0.1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_dnq_config_validation():
    assert DNQConfig(target_bits="W2A4").bits == (2, 4)
    with pytest.raises(ConfigError, match="method.target_bits"):
        DNQConfig(target_bits="w4")
    with pytest.raises(ConfigError, match="act_noise_p"):
        DNQConfig(act_noise_p=1.5)
    assert "dnq" in PRETRAIN_METHODS


# -- range methods --------------------------------------------------------------------------

def affine4(lo, hi):
    return range_to_affine(lo, hi, 0, 15, False)


def test_minmax_and_percentile_ranges_on_a_known_tensor():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10000, generator=g)
    x[1234] = 1000.0   # one outlier
    minmax = make_observer("minmax", per_channel=False)
    pct = make_observer("percentile", per_channel=False, percentile=99.99)
    for obs in (minmax, pct):
        obs(x[:6000])
        obs(x[6000:])
    lo, hi = minmax.range()
    assert lo.item() == x.min().item() and hi.item() == x.max().item()
    lo, hi = pct.range()
    ref = torch.quantile(x, torch.tensor([0.0001, 0.9999]))  # both tails (documented)
    assert torch.allclose(torch.stack([lo[0], hi[0]]), ref)
    assert hi.item() == pytest.approx(x[x < 1000].max().item(), rel=1e-3)   # outlier excluded
    assert pct.mean_abs().item() == pytest.approx(x.abs().mean().item(), rel=1e-5)


def test_sample_is_bounded_and_uniform():
    obs = PercentileObserver(per_channel=False, percentile=99.0, max_samples=2000)
    data = torch.arange(30000, dtype=torch.float32)
    for chunk in data.split(7000):
        obs(chunk)
    assert obs.samples.shape == (1, 2000)
    assert len(torch.unique(obs.samples)) == 2000    # without replacement, all real values
    standard_error = data.std().item() / math.sqrt(2000)
    assert abs(obs.samples.mean().item() - data.mean().item()) < 4 * standard_error
    assert obs.range()[1].item() == pytest.approx(0.99 * 29999, rel=0.02)


def test_mse_range_beats_minmax_on_heavy_tails_and_is_the_grid_optimum():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((50000,))
    obs = make_observer("mse", per_channel=False, affine=affine4, qmin=0, qmax=15)
    obs(x)
    lo, hi = obs.range()
    assert x.min() <= lo < 0 < hi <= x.max() and hi < x.max()

    def torch_mse(lo, hi):   # PyTorch's own fake-quant op as the reference error
        scale, zp = affine4(lo, hi)
        return (torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zp.item()), 0, 15)
                - x).pow(2).mean().item()

    candidates = [torch_mse(x.min() * k / 100, x.max() * k / 100) for k in range(1, 101)]
    assert torch_mse(lo, hi) == pytest.approx(min(candidates), rel=1e-4)
    assert torch_mse(lo, hi) < 0.9 * torch_mse(x.min(), x.max())


def test_mse_weights_per_channel_calibrated_once():
    model = resnet8().eval()
    data = [batch(n=2, seed=s)[0] for s in range(2)]
    q_mse = post_training_quantize(model, QuantConfig(w_bits=4, a_bits=4), data, range_method="mse")
    q_mm = post_training_quantize(model, QuantConfig(w_bits=4, a_bits=4), data)
    layer_mse, layer_mm = quant_layers(q_mse)[2][1], quant_layers(q_mm)[2][1]
    wq = layer_mse.weight_quantizer
    assert isinstance(wq, MinMaxQuantizer) and not wq.dynamic and layer_mm.weight_quantizer.dynamic
    w = layer_mse.weight.detach().reshape(wq.num_channels, -1)
    assert (wq.running_max <= w.max(1).values + 1e-7).all()
    assert (wq.running_max < w.max(1).values).any()
    calibrated = wq.running_max.clone()
    with torch.no_grad():
        q_mse(data[0])
    assert torch.equal(wq.running_max, calibrated)   # fixed after calibration
    with torch.no_grad():
        errors = [(layer.quantized_weight() - layer.weight).pow(2).mean().item()
                  for layer in (layer_mse, layer_mm)]
    assert errors[0] < errors[1]
    with pytest.raises(ConfigError, match="range_method"):
        post_training_quantize(model, QuantConfig(), data, range_method="kl")


# -- PTQ ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_fp_run(tmp_path_factory):
    """Two full epochs: PTQ accuracy needs a model that has learned something."""
    out = tmp_path_factory.mktemp("dnq") / "fp"
    assert main(["pretrain", "--model", "resnet8", "--data", "synthetic", "--epochs", "2",
                 "--lr", "0.1", "--batch-size", "64", "--no-progress", "--out", str(out)]) == 0
    return out


def test_ptq_at_8_bits_keeps_a_trained_models_accuracy(trained_fp_run):
    model, state = load_model(trained_fp_run)
    data = prepare_data(DataConfig.from_dict(state["meta"]["data"]))
    fp = evaluate(model, data.test, data.eval_pipeline, torch.device("cpu"))
    batches = calibration_batches(data.train, data.eval_pipeline, 100, 0)
    qmodel = post_training_quantize(model, QuantConfig(w_bits=8, a_bits=8), batches)
    assert all(isinstance(q, MinMaxQuantizer) for _, q in named_quantizers(qmodel))
    acc = evaluate(qmodel, data.test, data.eval_pipeline, torch.device("cpu"))["acc"]
    assert fp["acc"] > 80 and acc >= fp["acc"] - 1.5, (acc, fp["acc"])
    assert all(type(m) in (nn.Conv2d, nn.Linear) for _, m in float_layers(model))  # untouched


def test_cli_ptq_writes_a_loadable_run(trained_fp_run, tmp_path, capsys):
    out = tmp_path / "ptq"
    assert main(["ptq", str(trained_fp_run), "--bits", "w4a4", "--range-method", "percentile",
                 "--percentile", "99.9", "--device", "cpu", "--skip", "stages.1.0.shortcut.0",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "quantization plan: 9 layers quantized" in printed
    assert "float: stages.1.0.shortcut.0: skipped by quant.skip" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert f"{summary['test_acc']:.2f}%" in printed and f"{summary['fp_test_acc']:.2f}%" in printed
    model, state = load_model(out)
    assert state["meta"]["quant"]["quantizer"] == "minmax"
    assert state["meta"]["quant"]["range_method"] == "percentile"
    assert [m.bits for _, m in quant_layers(model)][1] == (4, 4)
    assert type(model.get_submodule("stages.1.0.shortcut.0")) is nn.Conv2d
    data = prepare_data(DataConfig.from_dict(state["meta"]["data"]))
    acc = evaluate(model, data.test, data.eval_pipeline, torch.device("cpu"))["acc"]
    assert acc == pytest.approx(summary["test_acc"])
    assert main(["ptq", str(trained_fp_run), "--bits", "w4a4", "--range-method", "kl",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "range_method" in capsys.readouterr().err


def test_cli_ptq_of_pretrained_weights_matches_ptq_of_the_run(trained_fp_run, tmp_path, capsys):
    """A user's state_dict (--model, --pretrained, the data flags) quantizes exactly as the run
    it came from."""
    model, _ = load_model(trained_fp_run)
    weights = tmp_path / "weights.pth"
    torch.save(model.state_dict(), weights)
    flags = ["--bits", "w4a4", "--device", "cpu"]
    assert main(["ptq", str(trained_fp_run), *flags, "--out", str(tmp_path / "run")]) == 0
    assert main(["ptq", "--model", "resnet8", "--pretrained", str(weights), "--data", "synthetic",
                 *flags, "--out", str(tmp_path / "weights")]) == 0
    from_run = json.loads((tmp_path / "run" / "summary.json").read_text())
    from_weights = json.loads((tmp_path / "weights" / "summary.json").read_text())
    for key in ("test_acc", "fp_test_acc", "test_loss"):
        assert from_weights[key] == from_run[key], key
    assert from_weights["source"] == str(weights)
    assert load_model(tmp_path / "weights")[1]["meta"]["model"] == "resnet8"
    capsys.readouterr()
    assert main(["ptq", str(trained_fp_run), "--model", "resnet8", "--pretrained", str(weights),
                 *flags, "--out", str(tmp_path / "both")]) == 2
    assert "either RUN or --model" in capsys.readouterr().err
    assert main(["ptq", *flags, "--out", str(tmp_path / "neither")]) == 2
    assert "ptq needs RUN" in capsys.readouterr().err
    assert main(["ptq", "--model", "resnet8", "--pretrained", str(tmp_path / "missing.pth"),
                 "--data", "synthetic", *flags, "--out", str(tmp_path / "missing")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("both", "neither", "missing"))


def test_cli_pretrain_dnq(tmp_path):
    out = tmp_path / "dnq"
    assert main(["pretrain", "--method", "dnq", "--target-bits", "w4a4", "--model", "resnet8",
                 "--data", "synthetic", "--epochs", "1", "--max-steps-per-epoch", "2",
                 "--batch-size", "32", "--no-progress", "--out", str(out)]) == 0
    model, state = load_model(out)
    assert state["config"]["method"]["name"] == "dnq"
    assert state["config"]["method"]["target_bits"] == "w4a4"
    objective = load_checkpoint(out, "checkpoint.pt")["objective"]
    assert {"coins", "noise", "input_ranges"} <= set(objective)
    assert len(objective["input_ranges"]) == len(float_layers(model))
    assert main(["pretrain", "--method", "dnq", "--target-bits", "w4", "--data", "synthetic",
                 "--out", str(tmp_path / "bad")]) == 2


# -- ViT ------------------------------------------------------------------------------------

def test_vit_tiny_ptq_and_dnq():
    torch.manual_seed(0)
    vit = build_model("vit_tiny", num_classes=10, in_channels=3).eval()
    x = torch.randn(2, 3, 32, 32)
    qvit = post_training_quantize(vit, QuantConfig(w_bits=8, a_bits=8), [x])
    names = [n for n, _ in quant_layers(qvit)]
    assert "blocks.0.attn.qkv" in names and "blocks.5.attn.proj" in names
    with torch.no_grad():
        ref, out = vit(x), qvit(x)
    assert ((out - ref).norm() / ref.norm()).item() < 0.1
    dnq = DNQ(vit, config=DNQConfig(target_bits="w4a4"), seed=0).train()
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    dnq.step(x, torch.arange(2), torch.optim.SGD(vit.parameters(), lr=0.0))
    assert all(torch.equal(p, before[n]) for n, p in vit.named_parameters())
    assert dnq.calls["blocks.0.attn.qkv"] == 1 and dnq.calls["blocks.3.mlp.2"] == 1
