"""Curvature of the training loss: Hessian trace (Hutchinson), top eigenvalues (power
iteration with deflation) and the trace per layer, all from Hessian-vector products.

H v comes from double backprop: g = dL/dw is computed once per batch with its graph kept
(create_graph=True), then H v = d(g . v)/dw for as many vectors v as needed
(retain_graph=True). That graph is the only thing kept between products, and only for the
batch in hand; every result leaves as a Python float, so memory does not grow with the
number of samples or iterations. Reusing one gradient graph for all the Hutchinson samples
of a batch is what makes the trace cheaper than recomputing the gradient for each sample.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import ConfigError
from .params import select_params
from .measuring import measuring

Closure = Callable[[], Tensor]


@dataclass
class Estimate:
    """A Monte-Carlo estimate and its standard error."""
    value: float
    stderr: float


@dataclass
class Eigen:
    """One eigenvalue from power iteration and its error bound.

    `residual` is ||H v - value v|| for the unit vector v the value belongs to: H (deflated by
    the eigenvectors found before) has an eigenvalue within `residual` of `value`.
    `converged` says residual <= tol * |value| was met within the iterations allowed.
    """
    value: float
    iterations: int
    converged: bool
    residual: float


def stratified(values: np.ndarray, weights: np.ndarray) -> Estimate:
    """Estimate sum_b w_b E[x_b] from `values` (batches, samples): the mean of each batch's
    samples, weighted, with the standard error of that weighted sum of means."""
    samples = values.shape[1]
    means = values.mean(axis=1)
    var = values.var(axis=1, ddof=1) if samples > 1 else np.full(len(values), np.nan)
    return Estimate(float(weights @ means), float(math.sqrt(weights ** 2 @ var / samples)))


class Hessian:
    """Products with the Hessian H of a loss, averaged over fixed pieces (batches).

    `losses[i]()` recomputes piece i of the loss (e.g. the mean cross-entropy of batch i);
    `weights` (default: equal) weigh the pieces, so H = sum_i w_i H_i. `params` are the
    (name, tensor) pairs H is taken with respect to.
    """

    def __init__(self, params: Sequence[tuple[str, Tensor]], losses: Sequence[Closure],
                 weights: Sequence[float] | None = None, progress: bool = False) -> None:
        if not params:
            raise ConfigError("Hessian: no parameters to differentiate")
        if not losses:
            raise ConfigError("Hessian: no loss to differentiate (no batches)")
        self.names = [name for name, _ in params]
        self.tensors = [tensor for _, tensor in params]
        self.numels = [t.numel() for t in self.tensors]
        self.size = sum(self.numels)
        self.losses = list(losses)
        w = np.ones(len(self.losses)) if weights is None else np.asarray(weights, dtype=float)
        self.weights = w / w.sum()
        self.progress = progress
        self._graph: tuple[int, tuple[Tensor, ...]] | None = None

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    def gradients(self, piece: int) -> tuple[Tensor, ...]:
        """dL_piece/dparams with their graph; the latest piece's graph is kept for reuse."""
        if self._graph is None or self._graph[0] != piece:
            self._graph = None  # free the previous graph before building the next one
            loss = self.losses[piece]()
            grads = torch.autograd.grad(loss, self.tensors, create_graph=True,
                                        allow_unused=True, materialize_grads=True)
            self._graph = (piece, grads)
        return self._graph[1]

    def release(self) -> None:
        """Drop the kept gradient graph."""
        self._graph = None

    def split(self, flat: Tensor) -> list[Tensor]:
        """A flat vector as views shaped like the parameters."""
        return [part.view_as(t) for part, t in zip(flat.split(self.numels), self.tensors)]

    def piece_product(self, piece: int, v: Tensor) -> Tensor:
        """H_piece v for a flat vector v, flat."""
        grads = self.gradients(piece)
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:  # the loss is linear in the parameters: H = 0
            return torch.zeros_like(v)
        parts = self.split(v)
        hv = torch.autograd.grad([grads[i] for i in live], self.tensors,
                                 grad_outputs=[parts[i] for i in live], retain_graph=True,
                                 allow_unused=True, materialize_grads=True)
        return torch.cat([h.reshape(-1) for h in hv])

    def matvec(self, v: Tensor) -> Tensor:
        """H v = sum_i w_i H_i v for a flat vector v."""
        out = torch.zeros_like(v)
        for piece, weight in enumerate(self.weights):
            out.add_(self.piece_product(piece, v), alpha=float(weight))
        return out

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def rademacher(self, generator: torch.Generator) -> Tensor:
        """A flat vector of independent +-1 entries."""
        v = torch.randint(0, 2, (self.size,), generator=generator, device=self.device,
                          dtype=self.dtype)
        return v.mul_(2).sub_(1)

    def trace(self, samples: int, seed: int = 0, groups: dict[str, list[str]] | None = None
              ) -> tuple[Estimate, dict[str, Estimate]]:
        """Hutchinson: Tr(H) = E[v^T H v] over Rademacher v, `samples` vectors per piece.

        Also returns, per group of parameters (default: each parameter alone),
        E[v_g . (H v)_g] = Tr(H_gg), the trace of the group's diagonal block, from the same
        products (the groups' parts sum to the total exactly, sample by sample).
        """
        if samples < 2:
            raise ConfigError(f"Hessian trace: need at least 2 samples for a standard error, "
                              f"got {samples}")
        generator = self._generator(seed)
        per_param = np.zeros((len(self.losses), samples, len(self.tensors)))
        bar = tqdm(total=len(self.losses) * samples, desc="Hessian trace", leave=False,
                   disable=not self.progress)
        for piece in range(len(self.losses)):
            for s in range(samples):
                v = self.rademacher(generator)
                contrib = v.mul_(self.piece_product(piece, v))  # v * Hv, in v's memory
                # float64 accumulation of each parameter's part, without a float64 copy
                sums = torch.stack([part.sum(dtype=torch.float64)
                                    for part in contrib.split(self.numels)])
                per_param[piece, s] = sums.cpu().numpy()
                bar.update()
        bar.close()
        if len(self.losses) > 1:
            self.release()
        total = stratified(per_param.sum(axis=2), self.weights)
        index = {name: i for i, name in enumerate(self.names)}
        groups = groups or {name: [name] for name in self.names}
        parts = {group: stratified(per_param[:, :, [index[n] for n in members]].sum(axis=2),
                                   self.weights)
                 for group, members in groups.items()}
        return total, parts

    def eigenvalues(self, k: int = 1, iters: int = 100, tol: float = 1e-3,
                    seed: int = 0) -> list[Eigen]:
        """The `k` eigenvalues of largest magnitude, by power iteration with deflation.

        Each search starts from a random vector and keeps it orthogonal to the eigenvectors
        already found; it stops when the residual ||H v - lambda v|| of the Rayleigh quotient
        lambda = v^T H v is at most `tol` * |lambda|, or after `iters` products. For a
        symmetric H the residual bounds the distance from lambda to an eigenvalue, so the
        tolerance holds however close the next eigenvalue is (a stop on the change of lambda
        between iterations does not: with the top two 2% apart it stopped 2% off at 1e-3).
        """
        if not 1 <= k <= self.size:
            raise ConfigError(f"top-k eigenvalues: k must be in 1..{self.size}, got {k}")
        if iters < 1:
            raise ConfigError(f"power iteration: iters must be >= 1, got {iters}")
        generator = self._generator(seed + 1)
        found: list[Tensor] = []
        result: list[Eigen] = []
        bar = tqdm(total=k * iters, desc="top eigenvalues", leave=False,
                   disable=not self.progress)
        for _ in range(k):
            v = _unit(_deflate(torch.randn(self.size, generator=generator, device=self.device,
                                           dtype=self.dtype), found))
            eigen = self._power_iteration(v, found, iters, tol, bar)
            bar.update(iters - eigen.iterations)
            found.append(v)
            result.append(eigen)
        bar.close()
        self.release()
        return result

    def _power_iteration(self, v: Tensor, found: list[Tensor], iters: int, tol: float,
                         bar: tqdm) -> Eigen:
        """Iterate the unit vector `v` in place towards the top eigenvector of H deflated by
        `found`; the result's value and residual belong to `v` as it is left."""
        eigen = Eigen(math.nan, 0, False, math.inf)
        for it in range(1, iters + 1):
            hv = _deflate(self.matvec(v), found)
            value = float(torch.dot(v, hv))
            residual = float((hv - value * v).norm())
            eigen = Eigen(value, it, residual <= tol * abs(value) or residual == 0.0, residual)
            bar.update()
            norm = float(hv.norm())
            if eigen.converged or norm == 0.0 or it == iters:
                break
            v.copy_(hv / norm)
        return eigen


def _deflate(v: Tensor, basis: list[Tensor]) -> Tensor:
    """v minus its projection on the orthonormal vectors in `basis` (Gram-Schmidt)."""
    for b in basis:
        v = v - torch.dot(v, b) * b
    return v


def _unit(v: Tensor) -> Tensor:
    return v / v.norm()


def batch_loss(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """The loss the analyses differentiate: mean cross-entropy of one batch, computed in at
    least float32 (half-precision logits are promoted)."""
    logits = model(images)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels)


def model_hessian(model: nn.Module, params: Sequence[tuple[str, Tensor]],
                  batches: Sequence[tuple[Tensor, Tensor]], progress: bool = False) -> Hessian:
    """The Hessian of the mean cross-entropy of `model` over `batches` (images, labels),
    each batch weighted by its size. Set the model's mode before using it."""
    def closure(images: Tensor, labels: Tensor) -> Closure:
        return lambda: batch_loss(model, images, labels)
    return Hessian(params, [closure(x, y) for x, y in batches],
                   [len(y) for _, y in batches], progress)


def _owner(name: str) -> str:
    """The module a parameter belongs to ('layer1.0.bn.weight' -> 'layer1.0.bn')."""
    return name.rsplit(".", 1)[0] if "." in name else name


def hessian_report(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]],
                   params: str = "weights", samples: int = 32, top_k: int = 3,
                   iters: int = 100, tol: float = 1e-3, seed: int = 0,
                   progress: bool = False) -> dict:
    """Tr(H) with its standard error, the top-k eigenvalues and the trace per layer, for the
    mean cross-entropy over `batches`, with respect to `params` ('weights' or 'all').

    The model runs in eval mode (BatchNorm uses its running statistics, quantizers still
    fake-quantize); its parameters, buffers and train/eval flags are left as they were.

    Args:
        model: float or quantized.
        batches: fixed (images, labels) batches, e.g. `flatq.analysis.sources.fixed_batches`.
        params: 'weights' (conv/linear weights) or 'all' trainable parameters.
        samples: Hutchinson vectors per batch.
        top_k, iters, tol: eigenvalues to find; most power iterations each; stop when
            ||Hv - lambda v|| <= tol |lambda|.
        seed: of the random vectors.
        progress: show a progress bar.

    Returns:
        A dict: trace (value, stderr), eigenvalues (value, residual, converged), trace per
        layer, num_params, num_images and seconds per part.

    Raises:
        ConfigError: `top_k` < 0, an unknown `params`, or no parameter to differentiate.
    """
    if top_k < 0:
        raise ConfigError(f"top-k eigenvalues: k must be >= 0, got {top_k}")
    with measuring(model):
        named = select_params(model, params)
        hessian = model_hessian(model, named, batches, progress)
        groups: dict[str, list[str]] = {}
        for name, _ in named:
            groups.setdefault(name if params == "weights" else _owner(name), []).append(name)
        start = time.perf_counter()
        total, layers = hessian.trace(samples, seed, groups)
        traced = time.perf_counter()
        eigen = hessian.eigenvalues(top_k, iters, tol, seed) if top_k else []
        done = time.perf_counter()
    sizes = dict(zip(hessian.names, hessian.numels))
    return {
        "kind": "hessian", "loss": "cross-entropy (mean over the batches)", "mode": "eval",
        "params": params, "num_params": hessian.size,
        "num_batches": len(batches), "num_images": int(sum(len(y) for _, y in batches)),
        "samples": samples, "seed": seed,
        "trace": {"value": total.value, "stderr": total.stderr},
        "eigenvalues": [{"value": e.value, "iterations": e.iterations,
                         "converged": e.converged, "residual": e.residual} for e in eigen],
        "eigen_tol": tol, "eigen_iters": iters,
        "layers": [{"name": group, "numel": sum(sizes[n] for n in members),
                    "trace": layers[group].value, "stderr": layers[group].stderr}
                   for group, members in groups.items()],
        "seconds": {"trace": traced - start, "eigenvalues": done - traced},
    }
