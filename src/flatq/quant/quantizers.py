"""Quantizers: LSQ, LSQ+, PACT and fixed min-max, one class each over one small base.

A quantizer fake-quantizes one tensor (a layer's weight, per output channel, or its input,
per tensor). It starts uninitialized; `flatq.calibrate` runs data through the model while
every quantizer observes its tensor, then sets the initial step size and zero point. Bit
width and signedness travel in the state_dict (as extra state), so a checkpoint of another
bit width is recognised instead of silently loaded.

A quantizer family registers itself by name (`@register_quantizer("lsq")`, the name
`quant.quantizer`, `quant.weight_quantizer` and `quant.input_quantizer` accept) and carries
everything the rest of flatq asks of it: how it is built for a layer's weight and input
(`for_weights`, `for_inputs`), which of its parameters take no weight decay
(`no_weight_decay`, read by the optimizer) and its integer view for export (`integer_grid`).
Adding a quantizer is its class, its test and that one decorator line.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from ..config import QUANTIZER_NAMES
from ..errors import ConfigError
from .functional import fake_quantize, integer_range
from .observers import RANGE_METHODS, MinMaxObserver, make_observer

if TYPE_CHECKING:
    from ..config import QuantConfig

EPS = 1e-8
INIT_METHODS = ("minmax", "lsq")


def range_to_affine(lo: Tensor, hi: Tensor, qmin: int, qmax: int,
                    signed: bool) -> tuple[Tensor, Tensor]:
    """Step size and zero point that map [lo, hi] onto the integer grid [qmin, qmax].

    Asymmetric (the FPQ paper's Eq. 5): s = (max - min) / (2^q - 1), z = round(qmax - max / s),
    with the range widened to contain 0 so that z lies on the grid and 0 is exact.
    Symmetric: z = 0 and s = max|x| / ((qmax - qmin) / 2), as torch.ao's symmetric observers.
    """
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    if signed:
        scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)
        return scale.clamp_min(EPS), torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zero_point = torch.clamp(torch.round(qmax - hi / scale), qmin, qmax)
    return scale, zero_point


def lsq_affine(lo: Tensor, hi: Tensor, mean_abs: Tensor, qmin: int, qmax: int,
               signed: bool) -> tuple[Tensor, Tensor]:
    """LSQ's initial step s = 2 mean|x| / sqrt(Qp) (Esser et al. 2019), with a zero point.

    LSQ defines Qp as the grid's positive levels: 2^(b-1) - 1 for signed data, 2^b - 1 for
    unsigned. On an asymmetric grid the zero point z splits the 2^b - 1 levels between the
    negative and the positive side in the proportion of the data's range [lo, hi]
    (z = round(qmax * -lo / (hi - lo))), and Qp = qmax - z are the levels left above zero. So
    symmetric data gets exactly LSQ's signed grid shifted by z, non-negative data LSQ's unsigned
    grid; data that is all <= 0 counts the levels below zero instead. Placing z from s instead
    (z = round(-lo / s)) put it on qmax at 2 bits and rounded most positive weights to 0.
    """
    if signed:
        zero_point = torch.zeros_like(mean_abs)
    else:
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
        share = -lo / (hi - lo).clamp_min(EPS)
        zero_point = torch.clamp(torch.round(qmax * share), qmin, qmax)
    levels = qmax - zero_point
    levels = torch.where(levels > 0, levels, zero_point - qmin)
    return (2 * mean_abs / torch.sqrt(levels)).clamp_min(EPS), zero_point


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """`x` in the forward pass, its gradient times `factor` in the backward (LSQ's gradient
    scale, for parameters that do not pass through `fake_quantize`'s own scaling)."""
    return x.detach() + (x - x.detach()) * factor


def positive_ste(x: Tensor) -> Tensor:
    """`x` clamped to >= EPS in the forward pass with the identity gradient, so that a step
    size pushed to or below zero by one large update still gets a gradient and can recover
    (a plain clamp would zero it for good; torch.ao's learnable fake-quant clamps the data
    in place to the same effect). Written so that the forward value is exactly the clamp
    (x + (clamp - x).detach() would round 1e-8 - 1 + 1 to 0 in float32)."""
    return x.detach().clamp_min(EPS) + (x - x.detach())


class Quantizer(nn.Module, ABC):
    """Base: bit width, integer grid, calibration by observation, and the broadcast shape.

    Subclasses implement `quantize(x)` and `init_from_observer(observer)`, and expose the
    effective `scale_and_zero_point()` used by SFP and by export.
    """

    learnable = True
    # Names of the quantizer's own parameters that are ranges, not weights: the optimizer
    # gives them no weight decay (decaying a step size would shrink the grid).
    no_weight_decay: ClassVar[tuple[str, ...]] = ()
    # Data-parallel ranks the quantized tensor's batch is split over (the trainer sets it on
    # input quantizers under DDP), so LSQ's N counts the global batch as in one process.
    replicas = 1
    # How calibration turns observed data into a range (see `set_range_method`).
    range_method = "minmax"
    percentile = 99.99

    def __init__(self, bits: int, signed: bool = False, per_channel: bool = False,
                 num_channels: int = 1, init: str = "minmax") -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {bits}")
        if init not in INIT_METHODS:
            raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}")
        self.bits, self.signed, self.init = bits, signed, init
        self.per_channel, self.num_channels = per_channel, num_channels if per_channel else 1
        self.register_buffer("initialized", torch.tensor(False))
        # The buffer as a Python bool, set at calibration and load time: forward reads it
        # without a device sync or a data-dependent branch (torch.compile, torch.export).
        self.calibrated = False
        self.observer: MinMaxObserver | None = None

    # -- construction from a QuantConfig ---------------------------------------------------
    @classmethod
    def for_weights(cls, bits: int, channels: int, config: "QuantConfig",
                    edge: bool = False) -> "Quantizer":
        """The quantizer this family puts on a layer's weight (`channels` output channels;
        `edge`: the first or last layer). Default: this class, per output channel."""
        return cls(bits, signed=config.symmetric_weights, per_channel=True,
                   num_channels=channels, init=config.weight_init(edge))

    @classmethod
    def for_inputs(cls, bits: int, config: "QuantConfig") -> "Quantizer":
        """The quantizer this family puts on a layer's input. Default: this class, per tensor."""
        return cls(bits, signed=config.symmetric_inputs, init=config.init)

    # -- integer grid ---------------------------------------------------------------------
    # A signed grid without its most negative level ([-qmax, qmax], as onnxruntime's and
    # TensorRT's symmetric weights): negating the integers (a negative BatchNorm scale folded
    # into the weights) stays on the grid.
    narrow_range = False

    @property
    def qmin(self) -> int:
        lo, hi = integer_range(self.bits, self.signed)
        return -hi if self.narrow_range and self.signed else lo

    @property
    def qmax(self) -> int:
        return integer_range(self.bits, self.signed)[1]

    def _shape(self, x: Tensor) -> tuple[int, ...]:
        """Shape that broadcasts a per-channel vector against `x` (channels on axis 0)."""
        return (-1,) + (1,) * (x.dim() - 1) if self.per_channel else (1,) * max(x.dim(), 1)

    def grad_factor(self, x: Tensor) -> float:
        """LSQ's gradient scale g = 1 / sqrt(N * Qp), N = elements per scale value (over all
        `replicas` ranks: DDP then averages gradients to what one process computes)."""
        n = x.numel() * self.replicas // self.num_channels
        return 1.0 / math.sqrt(n * max(self.qmax, 1))

    # -- calibration ----------------------------------------------------------------------
    def set_range_method(self, method: str, percentile: float = 99.99) -> "Quantizer":
        """Calibrate from the min-max range (default), the [100-p, p] percentiles, or the range
        minimizing the quantization MSE on this quantizer's grid (flatq.quant.observers)."""
        if method not in RANGE_METHODS:
            raise ValueError(f"range method must be one of {RANGE_METHODS}, got {method!r}")
        self.range_method, self.percentile = method, percentile
        return self

    def start_observing(self) -> None:
        self.observer = make_observer(
            self.range_method, self.per_channel, percentile=self.percentile, qmin=self.qmin,
            qmax=self.qmax, affine=self.range_affine)

    def range_affine(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """(scale, zero point) that this quantizer's grid gives the range [lo, hi]."""
        return range_to_affine(lo, hi, self.qmin, self.qmax, self.signed)

    def finish_observing(self) -> None:
        if self.observer is None or not self.observer.seen:
            raise RuntimeError("finish_observing() without observed data")
        with torch.no_grad():
            self.init_from_observer(self.observer)
        self.initialized.fill_(True)
        self.calibrated = True
        self.observer = None

    @abstractmethod
    def init_from_observer(self, observer: MinMaxObserver) -> None:
        """Set the initial range parameters from calibration statistics."""

    def initial_affine(self, observer: MinMaxObserver) -> tuple[Tensor, Tensor]:
        """Initial (scale, zero point) from observed data by the configured init method."""
        lo, hi = observer.range()
        if self.init == "lsq":
            return lsq_affine(lo, hi, observer.mean_abs(), self.qmin, self.qmax, self.signed)
        return self.range_affine(lo, hi)

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observer(x)
            return x
        if not self.calibrated:
            raise RuntimeError(
                f"{type(self).__name__} is not calibrated: call flatq.calibrate(model, batches) "
                "before running a quantized model")
        return self.quantize(x)

    @abstractmethod
    def quantize(self, x: Tensor) -> Tensor:
        """Fake-quantize `x` with the current parameters."""

    @abstractmethod
    def scale_and_zero_point(self) -> tuple[Tensor, Tensor]:
        """Effective step size (positive) and integer zero point, detached."""

    def step_size(self) -> Tensor:
        """The current step size, detached (per channel for weight quantizers)."""
        return self.scale_and_zero_point()[0]

    # -- export ---------------------------------------------------------------------------
    def integer_grid(self) -> tuple[Tensor, Tensor, int, int]:
        """The integer view exporters write: (scale, zero point, lo, hi), so that the
        quantizer computes (clamp(round(x / scale) + zero point, lo, hi) - zero point) * scale.

        Raises:
            ConfigError: the quantizer computes no such integer grid.
        """
        scale, zero_point = self.scale_and_zero_point()
        return scale, zero_point, self.qmin, self.qmax

    # -- state ----------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {"bits": self.bits, "signed": self.signed, "type": type(self).__name__}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.calibrated = bool(self.initialized)

    def set_extra_state(self, state: dict) -> None:
        if state.get("type") != type(self).__name__ or state.get("bits") != self.bits:
            raise ValueError(
                f"checkpoint holds a {state.get('bits')}-bit {state.get('type')}, "
                f"this model has a {self.bits}-bit {type(self).__name__}")
        self.signed = state["signed"]

    def extra_repr(self) -> str:
        grid = "signed" if self.signed else "unsigned"
        return f"bits={self.bits}, {grid}, per_channel={self.per_channel}"


QUANTIZERS: dict[str, type[Quantizer]] = {}


def register_quantizer(name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    """Class decorator: make a quantizer family choosable by `name` in QuantConfig."""

    def register(cls: type[Quantizer]) -> type[Quantizer]:
        QUANTIZERS[name] = cls
        if name not in QUANTIZER_NAMES:
            QUANTIZER_NAMES.append(name)
        return cls

    return register


def quantizer_family(name: str) -> type[Quantizer]:
    """The quantizer class registered as `name`."""
    if name not in QUANTIZERS:
        raise ConfigError(f"unknown quantizer {name!r}; available: {', '.join(QUANTIZERS)}")
    return QUANTIZERS[name]


@register_quantizer("lsq")
class LSQQuantizer(Quantizer):
    """Learned step size (Esser et al. 2019) with a zero point fixed after calibration."""

    no_weight_decay = ("scale",)

    def __init__(self, bits: int, signed: bool = False, per_channel: bool = False,
                 num_channels: int = 1, init: str = "minmax") -> None:
        super().__init__(bits, signed, per_channel, num_channels, init)
        self.scale = nn.Parameter(torch.ones(self.num_channels))
        self.register_buffer("zero_point", torch.zeros(self.num_channels))

    def init_from_observer(self, observer: MinMaxObserver) -> None:
        scale, zero_point = self.initial_affine(observer)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def _zero_point(self) -> Tensor:
        return self.zero_point

    def quantize(self, x: Tensor) -> Tensor:
        shape = self._shape(x)
        scale = positive_ste(self.scale).view(shape)
        return fake_quantize(x, scale, self._zero_point().view(shape), self.qmin, self.qmax,
                             self.grad_factor(x))

    def scale_and_zero_point(self) -> tuple[Tensor, Tensor]:
        return self.scale.detach().clamp_min(EPS), self._zero_point().detach()


@register_quantizer("lsq+")
class LSQPlusQuantizer(LSQQuantizer):
    """LSQ+ (Bhalgat et al. 2020): the offset beta is learned too.

    beta is a parameter in real units, as in the paper (x_hat = s * clip(round((x - beta) / s))
    + beta). By default (`continuous=False`) it enters the grid as the integer zero point
    round(-beta / s) (straight through the rounding and the clamp), so exports keep integer
    zero points; `continuous=True` uses beta itself, as the paper does, with the paper's
    min-max init s = (max - min) / (qmax - qmin), beta = min - qmin s (no widening to contain
    0), d x_hat / d beta = 1 outside the range and 0 inside, and LSQ's gradient scale g on
    beta as on s. A learned integer zero point z = -beta / s would move beta s^2 times slower
    than the paper's updates: on ReLU inputs it never left 0 in a 200-step fine-tune.
    As a family (`quantizer: lsq+`), weights take plain LSQ, as in the LSQ+ paper.
    """

    no_weight_decay = ("scale", "offset")

    @classmethod
    def for_weights(cls, bits: int, channels: int, config: "QuantConfig",
                    edge: bool = False) -> Quantizer:
        return LSQQuantizer.for_weights(bits, channels, config, edge)

    @classmethod
    def for_inputs(cls, bits: int, config: "QuantConfig") -> Quantizer:
        return cls(bits, signed=config.symmetric_inputs, init=config.init,
                   continuous=config.lsqplus_offset == "continuous")

    def __init__(self, bits: int, signed: bool = False, per_channel: bool = False,
                 num_channels: int = 1, init: str = "minmax", continuous: bool = False) -> None:
        super().__init__(bits, signed, per_channel, num_channels, init)
        del self.zero_point
        self.offset = nn.Parameter(torch.zeros(self.num_channels))
        self.continuous = continuous

    def range_affine(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        if not self.continuous:
            return super().range_affine(lo, hi)
        scale = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(EPS)
        return scale, self.qmin - lo / scale       # beta = -z s = lo - qmin s

    def init_from_observer(self, observer: MinMaxObserver) -> None:
        scale, zero_point = self.initial_affine(observer)
        self.scale.copy_(scale)
        self.offset.copy_(-zero_point * scale)

    def _zero_point(self) -> Tensor:
        # torch.clamp passes no gradient at its bounds, and ReLU inputs start exactly at
        # qmin: straight through both rounding and clamp, or beta could never move.
        zero = -self.offset / self.scale.detach().clamp_min(EPS)
        return zero + (torch.clamp(torch.round(zero), self.qmin, self.qmax) - zero).detach()

    def quantize(self, x: Tensor) -> Tensor:
        if not self.continuous:
            return super().quantize(x)
        shape, factor = self._shape(x), self.grad_factor(x)
        beta = scale_grad(self.offset, factor).view(shape)
        scale = positive_ste(self.scale).view(shape)
        return fake_quantize(x - beta, scale, beta.new_zeros(shape), self.qmin, self.qmax,
                             factor) + beta

    def integer_grid(self) -> tuple[Tensor, Tensor, int, int]:
        if self.continuous:
            raise ConfigError("an LSQ+ input quantizer with a continuous offset has no integer "
                              "zero point to export; train with quant.lsqplus_offset integer")
        return super().integer_grid()

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "continuous": self.continuous}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        if state.get("continuous", False) != self.continuous:
            kind = {True: "a continuous", False: "an integer"}
            raise ValueError(f"checkpoint holds LSQ+ with {kind[state.get('continuous', False)]} "
                             f"offset, this model has {kind[self.continuous]} one "
                             "(quant.lsqplus_offset)")


@register_quantizer("pact")
class PACTQuantizer(Quantizer):
    """PACT (Choi et al. 2018): clip to a learned alpha, then quantize [0, alpha] uniformly.

    y = 0.5 (|x| - |x - alpha| + alpha); the gradient of alpha is 1 where x >= alpha (STE
    through the rounding). Inputs that calibration finds negative (e.g. a normalized image)
    use the symmetric form clip(x, -alpha, alpha) on a signed grid. alpha gets weight decay
    (PACT's L2 penalty) from the trainer; step sizes and zero points do not. As a family
    (`quantizer: pact`), weights take min-max ranges recomputed every step, or with
    `pact_weights: dorefa` DoReFa's tanh quantizer (the PACT paper's) on all but the first
    and last layer (the classifier has no BatchNorm to absorb DoReFa's [-1, 1] weight scale,
    so those keep min-max).
    """

    no_weight_decay = ()    # alpha is decayed on purpose: PACT's L2 penalty

    @classmethod
    def for_weights(cls, bits: int, channels: int, config: "QuantConfig",
                    edge: bool = False) -> Quantizer:
        if config.pact_weights == "dorefa" and not edge:
            return DoReFaWeightQuantizer(bits)
        return MinMaxQuantizer.for_weights(bits, channels, config, edge, dynamic=True)

    def __init__(self, bits: int, signed: bool = False, per_channel: bool = False,
                 num_channels: int = 1, init: str = "minmax") -> None:
        if per_channel:
            raise ValueError("PACT clips activations per tensor; use it for inputs only")
        super().__init__(bits, signed, per_channel, num_channels, init)
        self.alpha = nn.Parameter(torch.tensor([10.0]))

    def init_from_observer(self, observer: MinMaxObserver) -> None:
        lo, hi = observer.range()
        self.signed = bool(lo.min() < 0)
        self.alpha.copy_(torch.maximum(hi, -lo).clamp_min(EPS) if self.signed
                         else hi.clamp_min(EPS))

    def quantize(self, x: Tensor) -> Tensor:
        alpha = positive_ste(self.alpha)
        lower = -alpha if self.signed else torch.zeros_like(alpha)
        y = torch.minimum(torch.maximum(x, lower), alpha)
        step = (alpha / self.qmax).detach()
        return y + (torch.round(y / step) * step - y).detach()

    def scale_and_zero_point(self) -> tuple[Tensor, Tensor]:
        return (self.alpha.detach().clamp_min(EPS) / self.qmax,
                torch.zeros(1, device=self.alpha.device))

    def integer_grid(self) -> tuple[Tensor, Tensor, int, int]:
        scale, zero_point, lo, hi = super().integer_grid()
        # Signed PACT clips symmetrically to [-alpha, alpha] = [-qmax, qmax] steps.
        return scale, zero_point, (-hi if self.signed else lo), hi


class DoReFaWeightQuantizer(Quantizer):
    """DoReFa-Net's weight quantizer (Zhou et al. 2016), which the PACT paper uses for weights:

        w_q = 2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1,
        quantize_k(u) = round((2^k - 1) u) / (2^k - 1),

    straight through the rounding, with the gradient of tanh and of the max. Weights land in
    [-1, 1] whatever their scale (the BatchNorm after the layer absorbs it), one range per
    tensor. Nothing to calibrate or learn; the grid is 2^k levels symmetric around 0, with a
    half-integer zero point, so the integers cannot be exported as an affine grid.
    """

    learnable = False

    def __init__(self, bits: int) -> None:
        super().__init__(bits, signed=False, per_channel=False)

    def init_from_observer(self, observer: MinMaxObserver) -> None:
        """No range to set: DoReFa normalizes by the weights' own max|tanh(w)| every call."""

    def quantize(self, x: Tensor) -> Tensor:
        t = torch.tanh(x)
        u = t / (2 * t.abs().max().clamp_min(EPS)) + 0.5
        levels = self.qmax
        u = u + (torch.round(u * levels) / levels - u).detach()
        return 2 * u - 1

    def scale_and_zero_point(self) -> tuple[Tensor, Tensor]:
        return (torch.tensor([2.0 / self.qmax], device=self.initialized.device),
                torch.tensor([self.qmax / 2], device=self.initialized.device))


@register_quantizer("minmax")
class MinMaxQuantizer(Quantizer):
    """Fixed quantizer from min/max: no learned parameters, straight-through for the input.

    `dynamic=True` recomputes the range from the tensor at every call (weights, which are
    always at hand); otherwise the calibrated range is kept and, while training, follows an
    exponential moving average of each batch's min/max (as torch.ao's moving-average observer).
    As a family (`quantizer: minmax`), weights are dynamic (recomputed every step) unless
    `range_method` is mse: then calibrated once.
    """

    learnable = False

    def __init__(self, bits: int, signed: bool = False, per_channel: bool = False,
                 num_channels: int = 1, init: str = "minmax", dynamic: bool = False,
                 momentum: float = 0.1) -> None:
        super().__init__(bits, signed, per_channel, num_channels, init)
        self.dynamic, self.momentum = dynamic, momentum
        self.register_buffer("running_min", torch.zeros(self.num_channels))
        self.register_buffer("running_max", torch.zeros(self.num_channels))

    @classmethod
    def for_weights(cls, bits: int, channels: int, config: "QuantConfig", edge: bool = False,
                    dynamic: bool | None = None) -> Quantizer:
        """`dynamic` None: recomputed every step unless `config.range_method` is mse."""
        if dynamic is None:
            dynamic = config.range_method != "mse"
        return cls(bits, signed=config.symmetric_weights, per_channel=True,
                   num_channels=channels, init=config.weight_init(edge), dynamic=dynamic)

    def init_from_observer(self, observer: MinMaxObserver) -> None:
        lo, hi = observer.range()
        self.running_min.copy_(lo)
        self.running_max.copy_(hi)

    def _range_of(self, x: Tensor) -> tuple[Tensor, Tensor]:
        flat = x.detach().reshape(x.shape[0], -1) if self.per_channel else x.detach().reshape(1, -1)
        return torch.aminmax(flat, dim=1)

    def quantize(self, x: Tensor) -> Tensor:
        if self.dynamic:
            lo, hi = self._range_of(x)
            self.running_min.copy_(lo)
            self.running_max.copy_(hi)
        elif self.training:
            lo, hi = self._range_of(x)
            self.running_min.lerp_(lo, self.momentum)
            self.running_max.lerp_(hi, self.momentum)
        scale, zero_point = self.scale_and_zero_point()
        shape = self._shape(x)
        return fake_quantize(x, scale.view(shape), zero_point.view(shape), self.qmin, self.qmax)

    def scale_and_zero_point(self) -> tuple[Tensor, Tensor]:
        return range_to_affine(self.running_min, self.running_max, self.qmin, self.qmax,
                               self.signed)

