"""Quantizers against independent references: PyTorch's built-in LSQ ops, closed forms, and
hand-computed calibration values."""

import math

import pytest
import torch

from flatq.quant import (DoReFaWeightQuantizer, LSQPlusQuantizer, LSQQuantizer, MinMaxQuantizer,
                         PACTQuantizer, fake_quantize, integer_range)
from flatq.quant.quantizers import range_to_affine

BITS = range(2, 9)


def calibrated(quantizer, *tensors):
    """`quantizer` after observing `tensors` (what flatq.calibrate does layer by layer)."""
    quantizer.start_observing()
    for t in tensors:
        quantizer(t)
    quantizer.finish_observing()
    return quantizer


def grads_of(fn, x, *params, upstream):
    """Output and gradients (input, then params) of fn(x) for a fixed upstream gradient."""
    x = x.clone().requires_grad_()
    out = fn(x)
    grads = torch.autograd.grad(out, (x, *params), upstream)
    return out.detach(), grads


# -- LSQ per tensor vs torch._fake_quantize_learnable_per_tensor_affine ----------------------

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_lsq_per_tensor_matches_torch(bits, signed):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 3, 6, 6, generator=g) * 1.5 + (0.0 if signed else 0.7)
    q = calibrated(LSQQuantizer(bits, signed=signed), x)
    with torch.no_grad():  # shrink the range so that values fall outside on both sides
        q.scale.mul_(0.6)
    upstream = torch.randn(x.shape, generator=g)
    out, (dx, ds) = grads_of(q, x, q.scale, upstream=upstream)

    qmin, qmax = integer_range(bits, signed)
    assert (q.qmin, q.qmax) == (qmin, qmax)
    factor = 1.0 / math.sqrt(x.numel() * qmax)
    scale = q.scale.detach().clone().requires_grad_()
    zero = q.zero_point.clone().requires_grad_()
    ref, (rdx, rds, rdz) = grads_of(
        lambda t: torch._fake_quantize_learnable_per_tensor_affine(t, scale, zero, qmin, qmax,
                                                                   factor),
        x, scale, zero, upstream=upstream)
    clipped = ((x / scale.detach() + zero.detach()).round() < qmin) | \
              ((x / scale.detach() + zero.detach()).round() > qmax)
    assert clipped.any() and (~clipped).any()  # both gradient branches are exercised
    if not signed:
        assert q.zero_point.item() != 0
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(dx, rdx, rtol=0, atol=0)
    torch.testing.assert_close(ds, rds, rtol=1e-5, atol=1e-6)
    # LSQ+ learns the offset beta = -z s (real units): d/d beta = -(d/dz) / s, torch's too.
    qp = calibrated(LSQPlusQuantizer(bits, signed=signed), x)
    with torch.no_grad():
        qp.scale.copy_(q.scale)
        qp.offset.copy_(-q.zero_point * q.scale)
    _, (pdx, pds, pdb) = grads_of(qp, x, qp.scale, qp.offset, upstream=upstream)
    torch.testing.assert_close(pdx, rdx, rtol=0, atol=0)
    torch.testing.assert_close(pds, rds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pdb, -rdz / scale.detach(), rtol=1e-5, atol=1e-6)
    assert rdz.abs().item() > 0


def test_lsq_plus_offset_snaps_to_the_grid_but_passes_gradient():
    x = torch.linspace(-2, 3, 200)
    q = calibrated(LSQPlusQuantizer(4), x)
    with torch.no_grad():
        q.scale.mul_(0.5)
        q.offset.sub_(0.3 * q.scale)  # off-grid: the forward must use the rounded zero point
    zero = (-q.offset / q.scale).detach()
    assert 0.2 < float(zero - zero.floor()) < 0.4
    rounded = torch._fake_quantize_learnable_per_tensor_affine(
        x, q.scale.detach(), zero.round(), 0, 15, 1.0)
    torch.testing.assert_close(q(x), rounded, rtol=0, atol=0)
    q(x).sum().backward()
    assert q.offset.grad.abs().item() > 0


def test_lsq_plus_offset_learns_from_its_calibrated_bound():
    """A ReLU output calibrates to zero point = qmin = 0 exactly; the offset must still get
    torch's gradient there (a plain clamp passes none at its bound, so LSQ+ trained as LSQ),
    in real units: d/d beta = -(d/dz) / s."""
    x = torch.linspace(0, 4, 200)
    q = calibrated(LSQPlusQuantizer(4), x)
    assert q.offset.item() == 0 and q.qmin == 0
    with torch.no_grad():
        q.scale.mul_(0.5)                       # clip the upper half of the values
    upstream = torch.linspace(-1, 1, 200)
    (q(x) * upstream).sum().backward()
    reference = torch.zeros(1, requires_grad=True)
    torch._fake_quantize_learnable_per_tensor_affine(
        x, q.scale.detach(), reference, 0, 15, q.grad_factor(x)).mul(upstream).sum().backward()
    assert reference.grad.abs().item() > 0
    torch.testing.assert_close(q.offset.grad, -reference.grad / q.scale.detach(),
                               rtol=1e-5, atol=1e-7)


def lsq_plus_reference(x, s, beta, qmin, qmax):
    """LSQ+ as its paper writes it: x_hat = clamp(round((x - beta) / s), n, p) s + beta, and
    its gradients: d/ds = round(u) - u inside, n or p outside; d/dbeta = 0 inside, 1 outside."""
    u = (x - beta) / s
    inside = (u >= qmin - 0.5) & (u <= qmax + 0.5)   # the rounded value lies on the grid
    q = torch.clamp(torch.round(u), qmin, qmax)
    d_s = torch.where(inside, torch.round(u) - u, q)
    return q * s + beta, d_s, (~inside).float()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_plus_continuous_offset_is_the_papers_formula(bits):
    """Swish-like inputs (a negative minimum): min-max init s = (max - min) / (2^b - 1),
    beta = min; forward and gradients of s and beta (times LSQ's g) as the paper's."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4000, generator=g) * 2
    x = x * torch.sigmoid(x)
    q = calibrated(LSQPlusQuantizer(bits, continuous=True), x)
    qmax = 2 ** bits - 1
    s, beta = (x.max() - x.min()) / qmax, x.min()
    torch.testing.assert_close(q.scale.detach(), s.reshape(1))
    torch.testing.assert_close(q.offset.detach(), beta.reshape(1))
    with torch.no_grad():                     # move off the calibrated range: clip both ends
        q.scale.mul_(0.7)
        q.offset.add_(0.37 * q.scale)
    upstream = torch.randn(x.shape, generator=g)
    out = q(x)
    (out * upstream).sum().backward()
    ref, d_s, d_beta = lsq_plus_reference(x, q.scale.detach(), q.offset.detach(), 0, qmax)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    factor = q.grad_factor(x)
    torch.testing.assert_close(q.scale.grad, ((d_s * upstream).sum() * factor).reshape(1),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.offset.grad, ((d_beta * upstream).sum() * factor).reshape(1),
                               rtol=1e-4, atol=1e-6)
    assert 0 < d_beta.mean() < 1


def test_lsq_plus_mse_init_minimizes_the_papers_error_over_the_searched_ranges():
    """range_method mse with the continuous offset: the MSE of the paper's x_hat at the chosen
    (s, beta) is the least over the candidate ranges [k min, k max], and below min-max's."""
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((20000,)).clamp_min(-0.5)
    q = calibrated(LSQPlusQuantizer(3, continuous=True).set_range_method("mse"), x)

    def mse(lo, hi):
        s = (hi - lo) / 7
        return (lsq_plus_reference(x, s, lo, 0, 7)[0] - x).pow(2).mean().item()
    chosen = (lsq_plus_reference(x, q.scale.detach(), q.offset.detach(), 0, 7)[0] - x)
    candidates = [mse(x.min() * k / 100, x.max() * k / 100) for k in range(1, 101)]
    assert chosen.pow(2).mean().item() == pytest.approx(min(candidates), rel=1e-4)
    assert chosen.pow(2).mean().item() < 0.9 * candidates[-1]


def test_lsq_plus_offset_kind_travels_in_the_checkpoint():
    x = torch.linspace(-1, 3, 100)
    continuous = calibrated(LSQPlusQuantizer(4, continuous=True), x)
    integer = LSQPlusQuantizer(4)
    with pytest.raises(ValueError, match="continuous"):
        integer.load_state_dict(continuous.state_dict())
    LSQPlusQuantizer(4, continuous=True).load_state_dict(continuous.state_dict())


# -- LSQ per channel vs torch._fake_quantize_learnable_per_channel_affine --------------------

@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (10, 16)], ids=["conv", "linear"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_lsq_per_channel_matches_torch(shape, bits, signed):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(shape, generator=g) * torch.linspace(0.2, 2.0, shape[0]).view(
        (-1,) + (1,) * (len(shape) - 1))
    q = calibrated(LSQQuantizer(bits, signed=signed, per_channel=True, num_channels=shape[0]), w)
    assert q.scale.shape == (shape[0],)
    with torch.no_grad():
        q.scale.mul_(0.7)
    upstream = torch.randn(shape, generator=g)
    out, (dw, ds) = grads_of(q, w, q.scale, upstream=upstream)

    qmin, qmax = integer_range(bits, signed)
    per_channel = w[0].numel()
    factor = 1.0 / math.sqrt(per_channel * qmax)
    assert q.grad_factor(w) == pytest.approx(factor)
    scale = q.scale.detach().clone().requires_grad_()
    zero = q.zero_point.clone().requires_grad_()
    ref, (rdw, rds) = grads_of(
        lambda t: torch._fake_quantize_learnable_per_channel_affine(t, scale, zero, 0, qmin, qmax,
                                                                    factor),
        w, scale, upstream=upstream)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(dw, rdw, rtol=0, atol=0)
    torch.testing.assert_close(ds, rds, rtol=1e-5, atol=1e-6)
    # The zero point of a plain LSQ quantizer is a fixed buffer, never trained.
    assert not q.zero_point.requires_grad
    assert "zero_point" not in dict(q.named_parameters())


@pytest.mark.parametrize("per_channel", [False, True], ids=["activations", "weights"])
def test_lsq_on_a_channels_last_tensor_matches_the_contiguous_one(per_channel):
    """train.channels_last: the step-size gradient reads a channels-last tensor in its memory
    order (no copy); output and input gradient are the same numbers, the step-size gradient the
    same sum in another order."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 8, 5, 5, generator=g)
    q = calibrated(LSQQuantizer(4, signed=True, per_channel=per_channel,
                                num_channels=6 if per_channel else None), x)
    upstream = torch.randn(x.shape, generator=g)
    nhwc = [t.contiguous(memory_format=torch.channels_last) for t in (x, upstream)]
    assert not nhwc[0].is_contiguous()
    out, (dx, ds) = grads_of(q, x, q.scale, upstream=upstream)
    out_cl, (dx_cl, ds_cl) = grads_of(q, nhwc[0], q.scale, upstream=nhwc[1])
    torch.testing.assert_close(out_cl, out, rtol=0, atol=0)
    torch.testing.assert_close(dx_cl, dx, rtol=0, atol=0)
    torch.testing.assert_close(ds_cl, ds, rtol=1e-5, atol=1e-7)
    assert ds.abs().min() > 0


def test_grad_factor_is_lsq_gradient_scale():
    x = torch.randn(2, 3, 4, 4)
    assert LSQQuantizer(4).grad_factor(x) == pytest.approx(1 / math.sqrt(x.numel() * 15))
    assert LSQQuantizer(4, signed=True).grad_factor(x) == pytest.approx(1 / math.sqrt(x.numel() * 7))
    w = torch.randn(6, 3, 3, 3)
    per_channel = LSQQuantizer(3, per_channel=True, num_channels=6)
    assert per_channel.grad_factor(w) == pytest.approx(1 / math.sqrt(27 * 7))


# -- calibration formulas ---------------------------------------------------------------------

def test_asymmetric_minmax_init_closed_form():
    x = torch.tensor([-1.0, 0.0, 0.5, 3.0])
    q = calibrated(LSQQuantizer(4), x)
    s = 4.0 / 15
    assert q.scale.item() == pytest.approx(s)
    assert q.zero_point.item() == round(15 - 3.0 / s) == 4
    # 0 is exactly representable and the observed extremes land on the grid ends
    assert q(torch.tensor([0.0])).item() == 0.0
    torch.testing.assert_close(q(torch.tensor([-1.0, 3.0])), torch.tensor([-1.0, 3.0]),
                               rtol=0, atol=s / 2 + 1e-6)


def test_range_is_widened_to_contain_zero():
    positive = calibrated(LSQQuantizer(4), torch.tensor([1.0, 2.0, 3.0]))
    assert positive.scale.item() == pytest.approx(3.0 / 15)  # min taken as 0, not 1
    assert positive.zero_point.item() == 0
    negative = calibrated(LSQQuantizer(4), torch.tensor([-3.0, -2.0]))
    assert negative.scale.item() == pytest.approx(3.0 / 15)  # max taken as 0
    assert negative.zero_point.item() == 15
    s, z = range_to_affine(torch.tensor([0.5]), torch.tensor([2.5]), 0, 255, signed=False)
    assert s.item() == pytest.approx(2.5 / 255) and z.item() == 0


def test_symmetric_init_closed_form():
    x = torch.tensor([-1.0, 0.5, 3.0])
    q = calibrated(LSQQuantizer(4, signed=True), x)
    assert q.scale.item() == pytest.approx(3.0 / ((7 - (-8)) / 2))
    assert q.zero_point.item() == 0
    w = torch.tensor([[1.0, -2.0], [0.25, 0.1]])
    pc = calibrated(LSQQuantizer(8, signed=True, per_channel=True, num_channels=2), w)
    torch.testing.assert_close(pc.scale.detach(), torch.tensor([2.0, 0.25]) / 127.5)


def test_per_channel_minmax_init_per_row():
    w = torch.tensor([[-1.0, 2.0, 0.0], [0.0, 0.3, 0.6]])
    q = calibrated(LSQQuantizer(2, per_channel=True, num_channels=2), w)
    torch.testing.assert_close(q.scale.detach(), torch.tensor([1.0, 0.2]))
    torch.testing.assert_close(q.zero_point, torch.tensor([round(3 - 2.0 / 1.0), 0.0]))


def test_lsq_init_closed_form():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 10, generator=g).abs() for _ in range(3)]
    q = calibrated(LSQQuantizer(4, init="lsq"), *batches)
    mean_abs = torch.cat(batches).abs().mean()
    assert q.scale.item() == pytest.approx((2 * mean_abs / math.sqrt(15)).item(), rel=1e-6)
    assert q.zero_point.item() == 0  # non-negative data: zero maps to the grid's bottom
    signed = calibrated(LSQQuantizer(3, signed=True, init="lsq"), torch.tensor([-2.0, 1.0, 0.0]))
    assert signed.scale.item() == pytest.approx(2 * 1.0 / math.sqrt(3))
    assert signed.zero_point.item() == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lsq_init_on_asymmetric_grid_is_lsqs_signed_grid_for_symmetric_weights(bits):
    """Weights symmetric around 0 on the asymmetric grid: LSQ's s = 2 mean|v| / sqrt(Qp),
    Qp = 2^(b-1) - 1, and the same quantized weights as LSQ's signed grid (torch's op)."""
    g = torch.Generator().manual_seed(bits)
    half = torch.randn(6, 50, generator=g)
    w = torch.cat([half, -half], dim=1)                      # exactly symmetric per channel
    q = calibrated(LSQQuantizer(bits, per_channel=True, num_channels=6, init="lsq"), w)
    qp, qn = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    s = 2 * w.abs().mean(dim=1) / math.sqrt(qp)
    torch.testing.assert_close(q.scale.detach(), s)
    reference = torch._fake_quantize_learnable_per_channel_affine(
        w, s, torch.zeros(6), 0, qn, qp, 1.0)
    torch.testing.assert_close(q(w), reference)
    positive = w > 0
    assert (q(w)[positive] > 0).float().mean() > 0.3         # was ~10% at 2 bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lsq_init_on_asymmetric_grid_follows_skewed_data(bits):
    """Non-negative data: LSQ's unsigned grid (z = 0, Qp = 2^b - 1). Data on [-1, 3]: the grid
    keeps levels on both sides of 0, split about as the data's range is."""
    g = torch.Generator().manual_seed(bits)
    relu = torch.rand(400, generator=g) * 3
    q = calibrated(LSQQuantizer(bits, init="lsq"), relu)
    assert q.zero_point.item() == 0
    assert q.scale.item() == pytest.approx(2 * relu.mean().item() / math.sqrt(2 ** bits - 1),
                                           rel=1e-6)
    skewed = torch.rand(400, generator=g) * 4 - 1
    q = calibrated(LSQQuantizer(bits, init="lsq"), skewed)
    z, qmax = q.zero_point.item(), 2 ** bits - 1
    assert 0 < z < qmax
    assert abs(z / qmax - 0.25) <= 0.5 / qmax + 1e-9          # 1/4 of the range lies below 0
    assert q.scale.item() == pytest.approx(
        2 * skewed.abs().mean().item() / math.sqrt(qmax - z), rel=1e-6)


def test_lsq_init_on_nonpositive_data_counts_the_levels_below_zero():
    x = -torch.linspace(0, 2, 100)
    q = calibrated(LSQQuantizer(4, init="lsq"), x)
    assert q.zero_point.item() == 15
    assert q.scale.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(15), rel=1e-6)


def test_calibration_accumulates_over_batches():
    q = calibrated(LSQQuantizer(4), torch.tensor([0.0, 1.0]), torch.tensor([-2.0, 0.5]))
    assert q.scale.item() == pytest.approx(3.0 / 15)
    assert q.zero_point.item() == 10  # round(15 - 1 / 0.2)


# -- positivity of step sizes -----------------------------------------------------------------

@pytest.mark.parametrize("cls", [LSQQuantizer, LSQPlusQuantizer])
def test_negative_scale_still_gives_positive_step_and_can_recover(cls):
    x = torch.linspace(-1, 2, 64)
    q = calibrated(cls(4), x)
    with torch.no_grad():
        q.scale.fill_(-0.5)  # as if one large SGD step crossed zero
    y = q(x)
    assert torch.isfinite(y).all()
    step, _ = q.scale_and_zero_point()
    assert (step > 0).all() and (q.step_size() > 0).all()
    # The layer is not dead: the loss still moves the scale back.
    ((y - x) ** 2).sum().backward()
    assert q.scale.grad.item() < 0  # descent increases the scale


def test_pact_alpha_stays_positive():
    p = calibrated(PACTQuantizer(4), torch.rand(20))
    with torch.no_grad():
        p.alpha.fill_(-1.0)
    assert (p.step_size() > 0).all()
    x = torch.rand(20) + 0.1
    y = p(x)
    assert torch.isfinite(y).all()
    ((y - x) ** 2).sum().backward()
    assert p.alpha.grad.item() < 0  # descent raises alpha again


# -- PACT -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pact_forward_and_alpha_gradient_closed_form(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.rand(500, generator=g) * 4
    p = calibrated(PACTQuantizer(bits), x)
    assert not p.signed and p.alpha.item() == pytest.approx(x.max().item())
    alpha = 2.5
    with torch.no_grad():
        p.alpha.fill_(alpha)
    upstream = torch.randn(x.shape, generator=g)
    out, (dx, dalpha) = grads_of(p, x, p.alpha, upstream=upstream)
    levels = 2 ** bits - 1
    step = alpha / levels
    expected = torch.round(torch.clamp(x, 0, alpha) / step) * step
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # PACT: d y / d alpha = 1 where x >= alpha, STE through rounding elsewhere
    torch.testing.assert_close(dalpha, upstream[x >= alpha].sum().reshape(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, upstream * ((x >= 0) & (x < alpha)), rtol=0, atol=0)
    assert (x >= alpha).sum() > 10


def test_pact_negative_inputs_switch_to_signed():
    x = torch.linspace(-3, 2, 101)
    p = calibrated(PACTQuantizer(4), x)
    assert p.signed and (p.qmin, p.qmax) == (-8, 7)
    assert p.alpha.item() == pytest.approx(3.0)
    y = p(x)
    step = 3.0 / 7
    expected = torch.round(torch.clamp(x, -3.0, 3.0) / step) * step
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    assert y.min().item() < 0


def test_pact_refuses_per_channel():
    with pytest.raises(ValueError, match="per tensor"):
        PACTQuantizer(4, per_channel=True, num_channels=3)


# -- DoReFa weights (PACT's) ------------------------------------------------------------------

def dorefa_reference(w: torch.Tensor, k: int) -> torch.Tensor:
    """DoReFa-Net's weight quantizer as the paper writes it."""
    def quantize_k(u):
        n = 2 ** k - 1
        return torch.round(n * u) / n
    t = torch.tanh(w)
    return 2 * quantize_k(t / (2 * t.abs().max()) + 0.5) - 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dorefa_weights_match_the_paper_and_pass_gradient_straight_through(bits):
    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(8, 4, 3, 3, generator=g) * 0.2).requires_grad_()
    q = calibrated(DoReFaWeightQuantizer(bits), w.detach())
    out = q(w)
    torch.testing.assert_close(out, dorefa_reference(w.detach(), bits), rtol=0, atol=1e-6)
    assert len(out.unique()) <= 2 ** bits and out.abs().max().item() == pytest.approx(1.0)
    upstream = torch.randn(w.shape, generator=g)
    (grad,) = torch.autograd.grad(out, w, upstream)
    # Straight through the rounding: the gradient of the unrounded map tanh(w) / max|tanh(w)|.
    w_ref = w.detach().clone().requires_grad_()
    t = torch.tanh(w_ref)
    (expected,) = torch.autograd.grad(t / t.abs().max(), w_ref, upstream)
    torch.testing.assert_close(grad, expected)


# -- MinMax -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_minmax_dynamic_per_channel_matches_torch(bits, signed):
    g = torch.Generator().manual_seed(bits)
    first = torch.randn(6, 3, 3, 3, generator=g)
    q = calibrated(MinMaxQuantizer(bits, signed=signed, per_channel=True, num_channels=6,
                                   dynamic=True), first)
    w = torch.randn(6, 3, 3, 3, generator=g) * 3  # another tensor: the range must follow it
    flat = w.reshape(6, -1)
    lo, hi = flat.min(1).values.clamp(max=0), flat.max(1).values.clamp(min=0)
    qmin, qmax = integer_range(bits, signed)
    if signed:
        scale, zero = torch.maximum(-lo, hi) / ((qmax - qmin) / 2), torch.zeros(6)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = torch.round(qmax - hi / scale)
    ref = torch.fake_quantize_per_channel_affine(w, scale, zero.int(), 0, qmin, qmax)
    wr = w.clone().requires_grad_()
    out = q(wr)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    out.sum().backward()
    inside = (torch.round(w / scale.view(-1, 1, 1, 1)) + zero.view(-1, 1, 1, 1)).clamp(qmin, qmax) \
        == torch.round(w / scale.view(-1, 1, 1, 1)) + zero.view(-1, 1, 1, 1)
    assert inside.float().mean() > 0.95
    torch.testing.assert_close(wr.grad, inside.float(), rtol=0, atol=0)  # straight through
    assert not list(q.parameters())


def test_minmax_static_follows_ema_in_training_only():
    q = calibrated(MinMaxQuantizer(8), torch.tensor([0.0, 1.0]))
    q.eval()
    q(torch.tensor([0.0, 11.0]))
    assert q.running_max.item() == pytest.approx(1.0)
    q.train()
    q(torch.tensor([0.0, 11.0]))
    assert q.running_max.item() == pytest.approx(2.0)  # 1 + 0.1 * (11 - 1)


# -- errors and state -------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [LSQQuantizer, LSQPlusQuantizer, PACTQuantizer, MinMaxQuantizer])
def test_uncalibrated_quantizer_raises_clear_error(cls):
    with pytest.raises(RuntimeError, match=r"not calibrated.*flatq\.calibrate"):
        cls(4)(torch.randn(3))


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bits_outside_2_to_8_rejected(bits):
    with pytest.raises(ValueError, match="2..8"):
        LSQQuantizer(bits)


def test_finish_observing_without_data_raises():
    q = LSQQuantizer(4)
    q.start_observing()
    with pytest.raises(RuntimeError, match="without observed data"):
        q.finish_observing()


@pytest.mark.parametrize("make", [
    lambda: LSQQuantizer(3, per_channel=True, num_channels=4),
    lambda: LSQPlusQuantizer(5),
    lambda: PACTQuantizer(4),
    lambda: MinMaxQuantizer(6, per_channel=True, num_channels=4, dynamic=True),
], ids=["lsq", "lsq+", "pact", "minmax"])
def test_state_dict_round_trip(make):
    x = torch.randn(4, 5) - 0.5
    src = calibrated(make(), x)
    dst = make()
    dst.load_state_dict(src.state_dict())
    assert bool(dst.initialized)
    assert dst.signed == src.signed  # PACT decides signedness at calibration
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    assert src.state_dict()["_extra_state"]["bits"] == src.bits


def test_bits_mismatch_on_load_refused():
    src = calibrated(LSQQuantizer(4), torch.randn(10))
    with pytest.raises(ValueError, match="4-bit LSQQuantizer.*3-bit LSQQuantizer"):
        LSQQuantizer(3).load_state_dict(src.state_dict())
    with pytest.raises(ValueError, match="LSQQuantizer.*LSQPlusQuantizer"):
        LSQPlusQuantizer(4).load_state_dict(src.state_dict(), strict=False)


# -- fake_quantize kernel: per-channel LSQ+ zero point and bfloat16 inputs ---------------------

def test_fake_quantize_per_channel_zero_point_gradient_matches_torch():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 4, 3, 3, generator=g) * 2
    scale = torch.linspace(0.1, 0.4, 5).requires_grad_()
    zero = torch.tensor([0.0, 3.0, 7.0, 12.0, 15.0], requires_grad=True)
    upstream = torch.randn(w.shape, generator=g)
    shape = (-1, 1, 1, 1)
    out, (dw, ds, dz) = grads_of(
        lambda t: fake_quantize(t, scale.view(shape), zero.view(shape), 0, 15, 0.2), w, scale,
        zero, upstream=upstream)
    ref, (rdw, rds, rdz) = grads_of(
        lambda t: torch._fake_quantize_learnable_per_channel_affine(t, scale, zero, 0, 0, 15, 0.2),
        w, scale, zero, upstream=upstream)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(dw, rdw, rtol=0, atol=0)
    torch.testing.assert_close(ds, rds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz, rdz, rtol=1e-5, atol=1e-6)
    assert (rdz != 0).all()


@pytest.mark.parametrize("qmin,qmax", [(0, 15), (-8, 7), (0, 3)])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_fake_quantize_ties_follow_torch_forward_and_gradient_follows_clipping(qmin, qmax, zero):
    """Inputs on quarter steps put x/s exactly on half-integers. With s a power of two,
    PyTorch's fake-quant op (x * (1/s)) is exact, so the outputs must match bit for bit,
    ties rounding to even before the zero point is added (ONNX's order). The input gradient
    must pass exactly where that forward did not clip; PyTorch's learnable op decides by
    round(x/s + z) instead, which disagrees with its own forward at odd-z ties."""
    s = 0.5
    x = (torch.arange((qmin - zero - 3) * 4, (qmax - zero + 3) * 4 + 1) / 4 * s).requires_grad_()
    scale = torch.tensor([s], requires_grad=True)
    zero_point = torch.tensor([float(zero)], requires_grad=True)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(zero))
    out = fake_quantize(x, scale, zero_point, qmin, qmax, 0.3)
    dx, ds, dz = torch.autograd.grad(out, (x, scale, zero_point), upstream)

    expected = torch.fake_quantize_per_tensor_affine(x.detach(), s, zero, qmin, qmax)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    integers = torch.round(x.detach().double() / s) + zero
    inside = (integers >= qmin) & (integers <= qmax)
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(dx, torch.where(inside, upstream, 0.0), rtol=0, atol=0)
    # LSQ closed forms in float64: d x_hat/ds = round(u) - u inside, clamp(q) - z outside.
    u = x.detach().double() / s
    d_scale = torch.where(inside, integers - zero - u, integers.clamp(qmin, qmax) - zero)
    up = upstream.double()
    torch.testing.assert_close(ds.double(), (up * d_scale).sum().reshape(1) * 0.3,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz.double(), -(up * ~inside).sum().reshape(1) * s * 0.3,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fake_quantize_gradient_mask_is_exact_next_to_the_clipping_points(dtype):
    """Right at the clipping points float rounding of x / s decides whether a value is
    clipped. Inputs within 40 units in the last place of both points, for 200 random step
    sizes and zero points, must get the gradient exactly where round(x/s) + z lies in range
    (a guard for any faster way of masking than recomputing the integers)."""
    g = torch.Generator().manual_seed(7)
    for trial in range(200):
        bits = int(torch.randint(2, 9, (), generator=g))
        signed = bool(trial % 2)
        qmin, qmax = integer_range(bits, signed)
        scale = float(10 ** (torch.rand((), generator=g, dtype=torch.float64) * 5 - 4))
        zero = 0.0 if signed else float(torch.randint(qmin, qmax + 1, (), generator=g))
        ends = torch.tensor([(qmin - zero - 0.5) * scale, (qmax - zero + 0.5) * scale], dtype=dtype)
        x = ends.repeat_interleave(81)
        ups = torch.arange(-40, 41).repeat(2)
        for _ in range(40):  # walk each copy of an end by its own number of ulps
            x = torch.where(ups > 0, torch.nextafter(x, torch.tensor(math.inf, dtype=dtype)), x)
            x = torch.where(ups < 0, torch.nextafter(x, torch.tensor(-math.inf, dtype=dtype)), x)
            ups = ups - ups.sign()
        x.requires_grad_()
        s = torch.tensor([scale], dtype=dtype, requires_grad=True)
        upstream = torch.rand(x.shape, generator=g, dtype=dtype) + 1
        out = fake_quantize(x, s, torch.tensor([zero], dtype=dtype), qmin, qmax, 1.0)
        dx, _ = torch.autograd.grad(out, (x, s), upstream)
        integers = torch.round(x.detach() / s.detach()) + zero
        inside = (integers >= qmin) & (integers <= qmax)
        assert inside.any() and (~inside).any()
        torch.testing.assert_close(dx, torch.where(inside, upstream, 0.0), rtol=0, atol=0)


def test_fake_quantize_bfloat16_input_computes_in_float32():
    x = (torch.randn(2, 3, 4, 4) * 2).bfloat16().requires_grad_()
    scale = torch.tensor([0.25], requires_grad=True)
    zero = torch.tensor([8.0])
    out = fake_quantize(x, scale, zero, 0, 15, 0.5)
    assert out.dtype == torch.float32
    ref = fake_quantize(x.detach().float(), scale.detach(), zero, 0, 15, 0.5)
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=0)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and scale.grad is not None
