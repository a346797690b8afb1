"""DNQ, differential noise-driven pre-conditioning (Xia, Pang, Cai 2025): train the
full-precision model under noise shaped like the quantization error it will later suffer, so
that it settles in a flat minimum and survives plain post-training quantization.

A uniform quantizer of step s has rounding error ~ U[-s/2, s/2], variance s^2/12; DNQ models
it as Gaussian noise of that variance at the target bit width:

- weights (every step, every conv/linear layer): eps ~ N(0, sigma_w^2) per output channel,
  sigma_w = s_w / sqrt(12), s_w the step of a min-max quantizer on the *current* weights of
  that channel. Loss and gradients are taken at w + eps, the clean w is restored exactly,
  then the optimizer updates the clean w ("differential": the scale differs per channel and
  follows the weights as they change).
- activations: each layer's input gets N(0, sigma_a^2) with probability p (per layer, per
  training forward), sigma_a = s_a / sqrt(12), s_a the step of a min-max quantizer on an
  exponential moving average of that input's min/max. Never in eval mode.

Steps come from `range_to_affine`, the very map the PTQ quantizers use (asymmetric, range
widened to contain 0). The first and last layer get the noise of `edge_bits` (8), as they
are quantized at 8 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import MethodConfig, QuantConfig, option, parse_bits, register_method_config
from ..errors import ConfigError
from ..quant import integer_range, layer_plan
from ..quant.quantizers import range_to_affine
from .base import Objective, total_loss

SQRT12 = math.sqrt(12.0)


@register_method_config
@dataclass
class DNQConfig(MethodConfig):
    """Options of DNQ; p = 0.5 and the EMA momentum are our defaults (the abstract gives none)."""
    name = "dnq"
    target_bits: str = option("w4a4", "bit widths the model is prepared for, wXaY: weight noise "
                              "from the X-bit step, input noise from the Y-bit step "
                              "(default ours)")
    edge_bits: int | None = option(8, "bit width whose noise the first and last layer get "
                                   "(none: the target bits; default 8 ours)", low=2, high=8)
    weight_noise: bool = option(True, "differential weight noise on/off (the paper's TL;DR)")
    act_noise: bool = option(True, "stochastic activation noise on/off (the paper's TL;DR)")
    act_noise_p: float = option(0.5, "probability that a layer's input is perturbed in a "
                                "training forward pass (default ours)", low=0.0, high=1.0)
    act_momentum: float = option(0.1, "momentum of the moving average of each layer's input "
                                 "min/max (default ours)", low=0.0, high=1.0)

    def validate(self) -> None:
        super().validate()
        try:
            parse_bits(self.target_bits)
        except ConfigError as exc:
            raise ConfigError(f"method.target_bits: {str(exc).removeprefix('bits: ')}") from None

    @property
    def bits(self) -> tuple[int, int]:
        """(weight bits, activation bits) of the inner layers."""
        return parse_bits(self.target_bits)


def noise_std(lo: Tensor, hi: Tensor, bits: int) -> Tensor:
    """s / sqrt(12): the std of the rounding error of a min-max quantizer on [lo, hi]."""
    qmin, qmax = integer_range(bits, signed=False)
    return range_to_affine(lo, hi, qmin, qmax, signed=False)[0] / SQRT12


def weight_noise_std(weight: Tensor, bits: int) -> Tensor:
    """sigma_w per output channel (axis 0) of `weight` at `bits`."""
    lo, hi = torch.aminmax(weight.detach().reshape(weight.shape[0], -1), dim=1)
    return noise_std(lo, hi, bits)


class DNQ(Objective):
    """Cross-entropy on a float model trained under DNQ's weight and activation noise.

    `seed` seeds the noise generators (default: drawn from torch's global generator, so it
    follows the run's --seed); their states and the input ranges are in `state_dict`.
    Counters `calls` / `fired` per layer make the realized activation-noise frequency
    observable.

    Args:
        student: the model being trained (the full-precision model being pretrained).
        teacher: the frozen full-precision model (not used).
        config: the method's options (default: DNQConfig()).
        seed: the seed of the noise generators (see above).
        **context: what a run offers beyond the models (the trainer passes `data`, `seed`);
            ignored where unused.

    Raises:
        ConfigError: as `quantize_model`'s plan for `config.target_bits`.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None,
                 config: DNQConfig | None = None, seed: int | None = None,
                 **context: Any) -> None:
        config = config or DNQConfig()
        super().__init__(student, teacher, config)
        w_bits, a_bits = config.bits
        plan = layer_plan(student, QuantConfig(w_bits=w_bits, a_bits=a_bits,
                                               edge_bits=config.edge_bits))
        self.layers = {name: (layer, bits) for name, layer, bits in plan}
        device = next(student.parameters()).device
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, ()).item())
        self.coins = torch.Generator().manual_seed(seed)
        self.noise = torch.Generator(device=device).manual_seed(seed + 1)
        self.input_ranges: dict[str, Tensor] = {}
        self.calls = dict.fromkeys(self.layers, 0)
        self.fired = dict.fromkeys(self.layers, 0)
        self._handles = ([layer.register_forward_pre_hook(self._input_hook(name))
                          for name, (layer, _) in self.layers.items()]
                         if config.act_noise else [])

    # -- activation noise -------------------------------------------------------------------
    def _input_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple) -> tuple | None:
            if not module.training:
                return None
            return (self.perturb_input(name, inputs[0]),) + tuple(inputs[1:])
        return hook

    def perturb_input(self, name: str, x: Tensor) -> Tensor:
        """Track the input range of layer `name`; with probability p add its Gaussian noise."""
        lo, hi = torch.aminmax(x.detach().float())
        batch = torch.stack([lo, hi])
        ema = self.input_ranges.get(name)
        momentum = self.config.act_momentum
        self.input_ranges[name] = batch if ema is None else ema.lerp(batch, momentum)
        self.calls[name] += 1
        if torch.rand((), generator=self.coins).item() >= self.config.act_noise_p:
            return x
        self.fired[name] += 1
        lo, hi = self.input_ranges[name]
        sigma = noise_std(lo, hi, self.layers[name][1][1]).to(x.dtype)
        noise = torch.randn(x.shape, generator=self.noise, device=x.device, dtype=x.dtype)
        return x + noise * sigma

    def frequencies(self) -> dict[str, float]:
        """Fraction of training forward passes in which each layer's input was perturbed."""
        return {n: self.fired[n] / self.calls[n] if self.calls[n] else 0.0 for n in self.layers}

    # -- weight noise -----------------------------------------------------------------------
    @torch.no_grad()
    def add_weight_noise(self) -> list[tuple[Tensor, Tensor]]:
        """Perturb every layer's weight in place; returns (weight, clean copy) pairs."""
        saved = []
        for layer, (bits, _) in self.layers.values():
            weight = layer.weight
            sigma = weight_noise_std(weight, bits).to(weight.dtype)
            saved.append((weight, weight.detach().clone()))
            noise = torch.randn(weight.shape, generator=self.noise, device=weight.device,
                                dtype=weight.dtype)
            weight.add_(noise * sigma.view(-1, *([1] * (weight.dim() - 1))))
        return saved

    @staticmethod
    @torch.no_grad()
    def restore_weights(saved: list[tuple[Tensor, Tensor]]) -> None:
        """Put the clean weights back bit for bit (in reverse, so shared weights end clean)."""
        for weight, clean in reversed(saved):
            weight.copy_(clean)

    def step(self, images: Tensor, labels: Tensor, optimizer: torch.optim.Optimizer,
             **extra: Tensor) -> dict[str, Tensor]:
        """Gradients at the noisy weights, update of the clean ones."""
        optimizer.zero_grad(set_to_none=True)
        saved = self.add_weight_noise() if self.config.weight_noise else []
        try:
            losses = self.forward_losses(images, labels, **extra)
            total_loss(losses).backward()
        finally:
            self.restore_weights(saved)
        optimizer.step()
        self.stepped()
        return {k: v.detach() for k, v in losses.items()}

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"coins": self.coins.get_state(), "noise": self.noise.get_state(),
                "input_ranges": {k: v.detach().cpu() for k, v in self.input_ranges.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "coins" in state:
            self.coins.set_state(state["coins"])
            self.noise.set_state(state["noise"])
            device = next(self.student.parameters()).device
            self.input_ranges = {k: v.to(device) for k, v in state["input_ranges"].items()}

    def generators(self) -> list[torch.Generator]:
        """Checkpointed per DDP rank, so each rank resumes its own noise stream."""
        return [self.coins, self.noise]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
