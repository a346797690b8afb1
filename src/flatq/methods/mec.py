"""MEC-Quant: maximize the entropy of the quantized student's representation.

Loss: CE - beta * L(Z) / mu, where for a batch of m L2-normalized embeddings Z (m x d)
    L(Z) = mu * log det(I_m + lambda Z Z^T),  mu = (m + d) / 2,  lambda = d / (m eps^2)
is the minimal coding length at distortion eps (Maximum Entropy Coding, Liu et al. 2022), a
tractable surrogate for the entropy; maximizing it spreads the representation that low-bit
quantization biases. log det is taken by its order-n Taylor series, optionally split into K
channel-group experts. Z is one view of the student's own embedding: this single-view form is
our simplification of MEC's cross-view loss (two views, EMA teacher, predictor), and the K
fixed channel groups are our reading, not MEC-Quant's long-tail mixture of experts. Provenance
of every formula and default: docs/mec.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MethodConfig, option, register_method_config
from ..errors import ConfigError
from ..quant import quant_layers
from .base import Objective
from .hooks import FeatureCapture


@register_method_config
@dataclass
class MECConfig(MethodConfig):
    """Options of MEC-Quant (single-view; our simplification of MEC's cross-view loss). The
    paper's own beta, eps, layer and gating are not known to us; the defaults below are ours
    (docs/mec.md derives them and gives each one's source)."""
    name = "mec"
    beta: float = option(1.0, "weight beta of the coding-rate term, single-view (our "
                         "simplification of MEC's cross-view loss): loss = CE - beta * L(Z)/mu "
                         "(ours; the paper's value is not known to us)", low=0.0)
    eps: float | None = option(None, "distortion eps, lambda = d/(m eps^2); default (none, "
                               "ours): eps^2 = 2d, so ||lambda Z Z^T||_2 <= lambda m = 1/2 and the "
                               "Taylor series converges for every batch of unit rows")
    order: int = option(4, "order n of the Taylor series of log det(I + C) (4 as in MEC's "
                       "code)", low=1, high=32)
    experts: int = option(1, "mixture-of-experts groups K: the features are split into K "
                          "fixed channel groups, one coding length each (ours, not the "
                          "paper's long-tail MoE; 1 = the plain form)", low=1)
    gate_logits: list[float] = option([], "fixed gate logits, one per expert; the weights are "
                                      "their softmax (default: uniform 1/K; not learned; ours)")
    layer: str = option("", "module whose input is the representation (default: the last "
                        "quantized layer, i.e. the penultimate embedding; ours)")

    def validate(self) -> None:
        super().validate()
        if self.eps is not None and self.eps <= 0:
            raise ConfigError(f"method.eps: the distortion must be positive, got {self.eps}")
        if self.gate_logits and len(self.gate_logits) != self.experts:
            raise ConfigError(f"method.gate_logits: expected one logit per expert "
                              f"({self.experts}), got {len(self.gate_logits)}")


def distortion_lambda(m: int, d: int, eps: float | None = None) -> float:
    """lambda = d / (m eps^2). eps None means eps^2 = 2d, i.e. lambda = 1/(2m): for unit rows
    ||Z Z^T||_2 <= Tr(Z Z^T) = m, so ||lambda Z Z^T||_2 <= 1/2 whatever the batch."""
    return 1.0 / (2 * m) if eps is None else d / (m * eps * eps)


def _scaled_gram(z: Tensor, eps: float | None) -> Tensor:
    """lambda Z Z^T (m x m) or lambda Z^T Z (d x d), whichever is smaller: the two share their
    nonzero eigenvalues, so det(I + .) and the trace of every power agree."""
    if z.dim() != 2:
        raise ValueError(f"expected a 2-D (m, d) feature matrix, got shape {tuple(z.shape)}")
    m, d = z.shape
    gram = z @ z.T if m <= d else z.T @ z
    return distortion_lambda(m, d, eps) * gram


def power_traces(c: Tensor, order: int) -> list[Tensor]:
    """[Tr(C), Tr(C^2), ..., Tr(C^order)] of a symmetric C with ceil(order/2) - 1 matrix
    products: Tr(C^(a+b)) is the elementwise sum of C^a * C^b because C^b is symmetric."""
    powers = [c]
    for _ in range((order + 1) // 2 - 1):
        powers.append(powers[-1] @ c)
    traces = [c.diagonal().sum()]
    for k in range(2, order + 1):
        traces.append((powers[(k + 1) // 2 - 1] * powers[k // 2 - 1]).sum())
    return traces


def coding_length_exact(z: Tensor, eps: float | None = None) -> Tensor:
    """mu * log det(I + lambda Z Z^T), by a Cholesky factorization (the reference)."""
    m, d = z.shape
    c = _scaled_gram(z, eps)
    chol = torch.linalg.cholesky(torch.eye(c.shape[0], dtype=c.dtype, device=c.device) + c)
    return (m + d) / 2 * 2 * chol.diagonal().log().sum()


def coding_length_taylor(z: Tensor, eps: float | None = None, order: int = 4) -> Tensor:
    """mu * Tr(sum_{k=1..n} (-1)^(k+1) C^k / k), C = lambda Z Z^T: matrix products only, so it
    is cheap and stable to differentiate; valid when ||C||_2 < 1 (the default eps ensures it)."""
    m, d = z.shape
    traces = power_traces(_scaled_gram(z, eps), order)
    series = sum((-1) ** (k + 1) * t / k for k, t in enumerate(traces, start=1))
    return (m + d) / 2 * series


def coding_length_moe(z: Tensor, eps: float | None = None, order: int = 4, experts: int = 1,
                      gate_logits: Tensor | Sequence[float] | None = None,
                      per_state: bool = False) -> Tensor:
    """sum_k w_k L(Z_k): Z's channels split into `experts` groups (sizes differ by at most one),
    each group's rows re-normalized, w = softmax(gate_logits) (uniform when None).

    Each expert's Gram matrix is at most d/K wide, hence the speed-up. `per_state` divides each
    L(Z_k) by its mu_k (the objective's normalization). With one expert and unit rows it is
    `coding_length_taylor` (divided by mu when `per_state`).
    """
    m, d = z.shape
    if not 1 <= experts <= d:
        raise ValueError(f"experts must lie in 1..{d} (the feature dimension), got {experts}")
    if gate_logits is None or len(gate_logits) == 0:
        weights = torch.full((experts,), 1.0 / experts, dtype=z.dtype, device=z.device)
    else:
        logits = torch.as_tensor(gate_logits, dtype=z.dtype, device=z.device)
        if logits.shape != (experts,):
            raise ValueError(f"expected {experts} gate logits, got shape {tuple(logits.shape)}")
        weights = torch.softmax(logits, dim=0)
    total = z.new_zeros(())
    for weight, group in zip(weights, torch.tensor_split(z, experts, dim=1)):
        length = coding_length_taylor(F.normalize(group, dim=1), eps, order)
        total = total + weight * (length / ((m + group.shape[1]) / 2) if per_state else length)
    return total


class MEC(Objective):
    """CE plus the negative coding rate of the student's representation (no teacher needed).

    The representation is the first input of `config.layer` (default: the last quantized
    layer), captured by a forward pre-hook, flattened per sample and L2-normalized. Any
    quantizer works: this is only a loss. In your own loop::

        with MEC(student, config=MECConfig(beta=1.0)) as objective:
            losses = objective.losses(images, labels)   # {'ce': ..., 'mec': -beta * L(Z)/mu}
            sum(losses.values()).backward()

    Args:
        student: the model being trained (the quantized student).
        teacher: the frozen full-precision model (not used).
        config: the method's options (default: MECConfig()).
        **context: what a run offers beyond the models (the trainer passes `data`, `seed`);
            ignored where unused.

    Raises:
        ConfigError: `config.layer` names no module, the model has no quantized layer, or
            more experts than the representation has dimensions.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None,
                 config: MECConfig | None = None, **context: Any) -> None:
        config = config or MECConfig()
        super().__init__(student, teacher, config)
        self.layer = self._resolve_layer(student, config.layer)
        width = getattr(dict(student.named_modules())[self.layer], "in_features", None)
        if width is not None and config.experts > width:   # a Linear's input: known now
            raise ConfigError(f"method.experts: {config.experts} experts exceed the {width} "
                              f"features of the input of {self.layer!r}")
        self.features = FeatureCapture(student, [self.layer], inputs=True)
        self._warned = False

    @staticmethod
    def _resolve_layer(student: nn.Module, name: str) -> str:
        if name:
            if name not in dict(student.named_modules()):
                raise ConfigError(f"method.layer: the model has no module named {name!r}")
            return name
        layers = quant_layers(student)
        if not layers:
            raise ConfigError("method.layer: the model has no quantized layer; name the layer "
                              "whose input is the representation")
        return layers[-1][0]

    def losses(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        out = {"ce": self.task_loss(self.student(images), labels)}
        (features,) = self.features.take()
        out["mec"] = -self.config.beta * self.coding_rate(features)
        return out

    def coding_rate(self, features: Tensor) -> Tensor:
        """L(Z)/mu of a batch of features (rows flattened, L2-normalized), in float32 even
        under autocast: the series sums terms of alternating sign."""
        config = self.config
        with torch.autocast(features.device.type, enabled=False):
            z = F.normalize(features.flatten(1).float(), dim=1)
            self._check(*z.shape)
            return coding_length_moe(z, config.eps, config.order, config.experts,
                                     config.gate_logits or None, per_state=True)

    def _check(self, m: int, d: int) -> None:
        if self.config.experts > d:
            raise ConfigError(f"method.experts: {self.config.experts} experts exceed the "
                              f"{d} features of the input of {self.layer!r}")
        widest = -(-d // self.config.experts)  # the largest channel group
        bound = distortion_lambda(m, widest, self.config.eps) * m
        if bound >= 1 and not self._warned:
            self._warned = True
            warnings.warn(f"mec: with eps={self.config.eps}, ||lambda Z Z^T||_2 may reach "
                          f"{bound:.3g} >= 1 at batch {m}; the Taylor series converges only "
                          "for spread-out features", stacklevel=2)

    def close(self) -> None:
        self.features.remove()
