"""MEC-Quant: coding length (exact, Taylor, mixture of experts) against independent references,
the objective's direction and gradients, and tiny end-to-end runs (API and CLI)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from flatq.cli import main as cli_main
from flatq.config import DataConfig, QuantConfig, RunConfig, TrainConfig, method_config
from flatq.errors import ConfigError
from flatq.methods import OBJECTIVES, QAT_METHODS, build_objective
from flatq.methods.mec import (MEC, MECConfig, coding_length_exact, coding_length_moe,
                               coding_length_taylor, distortion_lambda, power_traces)
from flatq.models import build_model
from flatq.quant import calibrate, quant_layers, quantize_model
from flatq.runs import load_teacher, qat


def unit_rows(m: int, d: int, seed: int = 0, nonnegative: bool = True) -> torch.Tensor:
    """Random L2-normalized rows; non-negative ones (like post-ReLU embeddings) are correlated,
    which puts the top eigenvalue of lambda Z Z^T near its bound."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(m, d, generator=g, dtype=torch.float64)
    return F.normalize(z if nonnegative else z - 0.5, dim=1)


def eigenvalues(z: torch.Tensor, eps: float | None) -> torch.Tensor:
    """Eigenvalues of C = lambda Z Z^T, always from the m x m matrix (independent of the Gram
    orientation the library picks)."""
    m, d = z.shape
    return torch.linalg.eigvalsh(distortion_lambda(m, d, eps) * z @ z.T)


def remainder_bound(sigma: torch.Tensor, order: int, mu: float) -> float:
    """mu * sum_i s_i^(n+1) / (n+1) / (1 - s_i): for 0 <= s < 1 the tail of
    log(1+s) = sum (-1)^(k+1) s^k / k after n terms is at most sum_{k>n} s^k/(n+1)."""
    s = sigma.clamp(min=0)
    assert s.max() < 1
    return mu * float((s ** (order + 1) / (order + 1) / (1 - s)).sum())


# -- coding length: references ---------------------------------------------------------------
@pytest.mark.parametrize("m,d", [(12, 20), (30, 8)])  # both Gram orientations
def test_exact_coding_length_matches_torch_logdet(m, d):
    z = unit_rows(m, d)
    lam = distortion_lambda(m, d, None)
    reference = (m + d) / 2 * torch.logdet(torch.eye(m, dtype=z.dtype) + lam * z @ z.T)
    assert torch.allclose(coding_length_exact(z), reference, rtol=1e-12)


def test_power_traces_match_matrix_power():
    c = unit_rows(9, 9, seed=3) @ unit_rows(9, 9, seed=3).T / 9
    for order in (1, 4, 5, 8):
        expected = [torch.trace(torch.linalg.matrix_power(c, k)) for k in range(1, order + 1)]
        assert torch.allclose(torch.stack(power_traces(c, order)), torch.stack(expected),
                              rtol=1e-12)


@pytest.mark.parametrize("m,d,radius", [(12, 20, None), (30, 8, None), (16, 24, 0.9),
                                        (40, 10, 0.7)])
def test_taylor_within_truncation_bound_and_bound_is_tight(m, d, radius):
    z = unit_rows(m, d, seed=m)
    eps = None
    if radius is not None:  # pick eps so that ||lambda Z Z^T||_2 equals `radius` exactly
        top = torch.linalg.eigvalsh(z @ z.T).max().item()
        eps = math.sqrt(d * top / (m * radius))
    sigma = eigenvalues(z, eps)
    if radius is not None:
        assert sigma.max().item() == pytest.approx(radius)
    exact = coding_length_exact(z, eps).item()
    top = sigma.max().item()
    for order in (2, 4, 6):
        error = abs(coding_length_taylor(z, eps, order).item() - exact)
        bound = remainder_bound(sigma, order, (m + d) / 2)
        assert error <= bound
        # Meaningful: every eigenvalue's tail has the sign of its first omitted term and at
        # least that term minus the next, s^(n+1)/(n+1) * (1 - (n+1)s/(n+2)); so the bound can
        # exceed the error by at most this factor (< 3.5 for the default eps, s <= 1/2).
        factor = 1 / ((1 - top) * (1 - (order + 1) * top / (order + 2)))
        assert error > 1e-9 * abs(exact)
        assert bound <= factor * error * (1 + 1e-9)
        if radius is None:
            assert factor < 3.5
    assert abs(coding_length_taylor(z, eps, 8).item() - exact) < \
        abs(coding_length_taylor(z, eps, 4).item() - exact)


def test_default_eps_bounds_the_spectrum_even_for_collapsed_features():
    m, d = 32, 16
    collapsed = F.normalize(torch.ones(m, d, dtype=torch.float64), dim=1)
    assert eigenvalues(collapsed, None).max().item() == pytest.approx(0.5)
    for seed in range(3):
        assert eigenvalues(unit_rows(m, d, seed), None).max().item() <= 0.5 + 1e-12


def test_taylor_gradient_matches_finite_differences():
    z = unit_rows(6, 5, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: coding_length_taylor(x, 0.8, 4), (z,))
    w = unit_rows(5, 7, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: coding_length_exact(x, None), (w,))


# -- mixture of experts ----------------------------------------------------------------------
@pytest.mark.parametrize("eps", [None, 3.0])
def test_moe_with_one_expert_is_the_plain_form(eps):
    z = unit_rows(20, 12, seed=5)
    plain = coding_length_taylor(z, eps, 4)
    assert torch.allclose(coding_length_moe(z, eps, 4, experts=1), plain, rtol=1e-12)
    assert torch.allclose(coding_length_moe(z, eps, 4, experts=1, gate_logits=[2.5]), plain,
                          rtol=1e-12)
    assert torch.allclose(coding_length_moe(z, eps, 4, experts=1, per_state=True),
                          plain / ((20 + 12) / 2), rtol=1e-12)


def test_moe_combines_per_group_lengths_with_softmax_gates():
    z = unit_rows(20, 11, seed=6)
    logits = [0.3, -1.0, 2.0]
    groups = [z[:, :4], z[:, 4:8], z[:, 8:]]  # 11 channels in 3 groups: 4, 4, 3
    weights = torch.softmax(torch.tensor(logits, dtype=z.dtype), 0)
    expected = sum(w * coding_length_taylor(F.normalize(g, dim=1), None, 4)
                   for w, g in zip(weights, groups))
    assert torch.allclose(coding_length_moe(z, None, 4, 3, logits), expected, rtol=1e-12)
    uniform = sum(coding_length_taylor(F.normalize(g, dim=1), None, 4) for g in groups) / 3
    assert torch.allclose(coding_length_moe(z, None, 4, 3), uniform, rtol=1e-12)
    with pytest.raises(ValueError, match="gate logits"):
        coding_length_moe(z, None, 4, 3, [1.0, 2.0])
    with pytest.raises(ValueError, match="experts"):
        coding_length_moe(z, None, 4, 12)


# -- the objective ---------------------------------------------------------------------------
def quantized_resnet8(config: QuantConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = quantize_model(build_model("resnet8", 10, 3), config)
    calibrate(model, [torch.randn(16, 3, 32, 32)], "cpu")
    return model


@pytest.mark.parametrize("experts", [1, 4])
def test_coding_rate_is_larger_for_diverse_than_for_collapsed_features(experts):
    mec = MEC(build_model("resnet8", 10, 3), config=MECConfig(experts=experts, layer="linear"))
    m, d = 16, 64
    diverse = torch.eye(m, d) + 0.01 * torch.randn(m, d, generator=torch.Generator().manual_seed(0))
    collapsed = torch.ones(m, d)
    assert mec.coding_rate(diverse).item() > mec.coding_rate(collapsed).item()
    mec.close()


def test_objective_captures_penultimate_embedding_and_gradient_reaches_weights():
    student = quantized_resnet8(QuantConfig(w_bits=2, a_bits=2))
    objective = build_objective(method_config("mec", {"beta": 1.0}), student)
    assert isinstance(objective, MEC) and "mec" in QAT_METHODS and OBJECTIVES["mec"] is MEC
    last_name, last = quant_layers(student)[-1]
    assert objective.layer == last_name and isinstance(last, torch.nn.Linear)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    seen = []
    handle = student.pool.register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    losses = objective.losses(images, labels)
    handle.remove()
    assert set(losses) == {"ce", "mec"} and losses["mec"].item() < 0
    # The term is -beta * log det(I + lambda Z Z^T) of the pooled embedding, within the
    # order-4 truncation bound 1/80 of the default eps (docs/mec.md).
    z = F.normalize(seen[0].flatten(1).double(), dim=1)
    reference = coding_length_exact(z) / ((z.shape[0] + z.shape[1]) / 2)
    assert z.shape == (8, last.in_features)
    assert abs(-losses["mec"].item() - reference.item()) <= 1 / 80
    losses["mec"].backward()  # the MEC term alone
    for name, layer in quant_layers(student)[:-1]:
        grad = layer.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert last.weight.grad is None  # the classifier comes after the representation
    objective.close()
    student(images)
    assert objective.features.outputs == {}  # hook removed


def test_coding_rate_is_float32_under_autocast():
    mec = MEC(build_model("resnet8", 10, 3), config=MECConfig(layer="linear"))
    features = torch.rand(16, 64)
    plain = mec.coding_rate(features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = mec.coding_rate(features)
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, plain)
    mec.close()


def test_objective_with_a_named_layer_and_bad_config():
    student = quantized_resnet8(QuantConfig())
    objective = MEC(student, config=MECConfig(layer="pool", experts=2, order=2))  # conv map
    losses = objective.losses(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert torch.isfinite(losses["mec"])
    objective.close()
    with pytest.raises(ConfigError, match="method.layer"):
        MEC(student, config=MECConfig(layer="nope"))
    with pytest.raises(ConfigError, match="method.gate_logits"):
        MECConfig(experts=2, gate_logits=[1.0])
    with pytest.raises(ConfigError, match="method.eps"):
        MECConfig(eps=0.0)
    with pytest.raises(ConfigError, match="method.experts: 10000 experts exceed the 64"):
        MEC(student, config=MECConfig(experts=10_000))        # a Linear's input: known at once
    too_many = MEC(student, config=MECConfig(layer="pool", experts=10_000))   # a conv map:
    with pytest.raises(ConfigError, match="method.experts"):                  # known at the
        too_many.losses(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))  # first batch
    too_many.close()
    with pytest.warns(UserWarning, match="Taylor series"):
        loose = MEC(student, config=MECConfig(eps=0.5))
        loose.losses(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    loose.close()


# -- end to end ------------------------------------------------------------------------------
def test_mec_qat_trains_end_to_end(fp_run, tmp_path):
    teacher, state = load_teacher(fp_run)
    config = RunConfig(model="resnet8", data=DataConfig(name="synthetic", augment=False),
                       train=TrainConfig(epochs=1, batch_size=32, lr=0.01, device="cpu",
                                         progress=False, max_steps_per_epoch=2),
                       quant=QuantConfig(w_bits=4, a_bits=4, quantizer="lsq+"),
                       method=method_config("mec", {"beta": 0.5, "experts": 2}))
    summary = qat(config, teacher, state, tmp_path / "q")
    assert summary["method"] == "mec" and 0 <= summary["test_acc"] <= 100
    rows = [json.loads(line) for line in (tmp_path / "q" / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in rows if "train_mec" in r]
    assert epoch and epoch[-1]["train_mec"] < 0 and math.isfinite(epoch[-1]["train_mec"])


def test_mec_qat_from_the_cli(fp_run, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(["qat", "--from", str(fp_run), "--method", "mec", "--bits", "w2a2",
                     "--beta", "0.2", "--quantizer", "pact", "--epochs", "1", "--batch-size",
                     "32", "--max-steps-per-epoch", "2", "--device", "cpu", "--no-progress",
                     "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["method"] == "mec"
    assert "w2a2 mec" in capsys.readouterr().out
    code = cli_main(["qat", "--from", str(fp_run), "--method", "mec", "--experts", "2",
                     "--gate-logits", "1.0", "--out", str(tmp_path / "bad")])
    assert code == 2 and "method.gate_logits" in capsys.readouterr().err
