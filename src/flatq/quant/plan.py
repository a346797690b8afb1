"""The quantization plan: which layers `quantize_model` swaps, at which bits, and why every
other weight-bearing module stays float.

Layers are matched by class, subclasses included (torchvision's attention out_proj is a Linear
subclass), unless the subclass changes what the layer computes. A layer whose weight an
enclosing module's forward reads directly (torchvision's Swin passes `self.qkv.weight` to a
function) would never run as a module once swapped: that is refused here, by name, with the
`skip` option that leaves it float, instead of failing later or training a float layer.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import inspect
import re
import textwrap
from dataclasses import asdict, dataclass, field

from torch import nn
from torch.nn.utils import parametrize

from ..config import QuantConfig
from ..errors import ConfigError
from .attention import QuantMultiheadAttention
from .layers import QUANT_LAYERS
from .residual import residual_blocks

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
NORM_REASON = "normalization: float by design (exported as trained)"
# Attributes of a weight that describe it rather than compute with it (`w.dtype`, `w.shape`).
_METADATA = {"dtype", "device", "shape", "ndim", "size", "dim", "is_cuda", "requires_grad",
             "numel"}


@dataclass(frozen=True)
class PlannedLayer:
    """A layer that is swapped for its quantized form."""
    name: str
    kind: str
    w_bits: int
    a_bits: int
    edge: bool


@dataclass(frozen=True)
class FloatLayer:
    """A module with its own parameters that stays float, and why."""
    name: str
    kind: str
    reason: str


@dataclass
class QuantPlan:
    """What `quantize_model` does to a model; `str()` lists every layer, `summary()` counts."""
    bits: tuple[int, int]
    quantized: list[PlannedLayer] = field(default_factory=list)
    float: list[FloatLayer] = field(default_factory=list)
    # Blocks whose residual add gets an 8-bit output point (target onnxruntime only).
    residual_points: list[str] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        w, a = self.bits
        if any((r.w_bits, r.a_bits) == self.bits for r in self.quantized):
            return []
        where = ", ".join(f"{r.name} w{r.w_bits}a{r.a_bits}" for r in self.quantized) or "none"
        return [f"no layer is quantized at the inner bit width w{w}a{a} (quantized: {where}); "
                "the inner layers are absent, skipped or left float (see the plan)"]

    def summary(self) -> str:
        """A few lines: layers per bit width, float modules grouped by reason, warnings."""
        norms = sum(r.reason == NORM_REASON for r in self.float)
        lines = [f"quantization plan: {len(self.quantized)} layers quantized, "
                 f"{len(self.float) - norms} other weight-bearing modules float"
                 f" (+ {norms} normalization layers)"]
        by_bits: dict[str, list[str]] = {}
        for r in self.quantized:
            by_bits.setdefault(f"w{r.w_bits}a{r.a_bits}", []).append(r.name)
        for bits, names in by_bits.items():
            lines.append(f"  {bits}: {len(names)} ({_first(names)})")
        by_reason: dict[str, list[str]] = {}
        for r in self.float:
            if r.reason != NORM_REASON:
                by_reason.setdefault(r.reason, []).append(r.name)
        for reason, names in by_reason.items():
            lines.append(f"  float: {_first([n or '(model)' for n in names])}: {reason}")
        if self.residual_points:
            lines.append(f"  output points on residual adds: {len(self.residual_points)} "
                         f"({_first(self.residual_points)}; 8-bit, or the grid of the layers "
                         "that read them, chosen at calibration)")
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])

    def __str__(self) -> str:
        rows = [f"  {r.name or '(model)'}  {r.kind}  w{r.w_bits}a{r.a_bits}"
                for r in self.quantized]
        rows += [f"  {r.name or '(model)'}  {r.kind}  float: {r.reason}" for r in self.float]
        return "\n".join([self.summary().splitlines()[0]] + rows
                         + [f"warning: {w}" for w in self.warnings])

    def to_dict(self) -> dict:
        return {"bits": list(self.bits), "quantized": [asdict(r) for r in self.quantized],
                "float": [asdict(r) for r in self.float],
                "residual_points": list(self.residual_points), "warnings": self.warnings}


def _first(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown if len(names) <= n else f"{shown}, ... {len(names) - n} more"


def quant_class(module: nn.Module) -> type[nn.Module] | str:
    """The quantized class `module` becomes, or the reason it stays float."""
    kind = type(module).__name__
    if isinstance(module, nn.MultiheadAttention):
        return QuantMultiheadAttention.unsupported(module) or QuantMultiheadAttention
    for base, quantized in QUANT_LAYERS.items():
        if not isinstance(module, base):
            continue
        own = {n for n, _ in module.named_parameters(recurse=False)} - {"weight", "bias"}
        if parametrize.is_parametrized(module) or own:
            return f"{kind}'s weight is computed (parametrization or weight_norm)"
        conv_forward = getattr(base, "_conv_forward", None)
        if (type(module).forward is not base.forward
                or getattr(type(module), "_conv_forward", None) is not conv_forward):
            return (f"{kind} overrides the forward of {base.__name__}; its quantized form "
                    "would drop that")
        if any(True for _ in module.children()):
            return f"{kind} has submodules a quantized {base.__name__} would drop"
        return quantized
    if isinstance(module, NORM_LAYERS):
        return NORM_REASON
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return ("transposed convolution: not quantized (its output channels lie on weight axis 1 "
                "and no exporter has an integer kernel for it)")
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding: a table lookup, not a product with an input"
    own = ", ".join(n for n, _ in module.named_parameters(recurse=False))
    return (f"{kind}'s own parameters ({own}): not the weight of a layer flatq quantizes (Conv1d, "
            "Conv2d, Linear, nn.MultiheadAttention)")


def _skipped(name: str, patterns: list[str]) -> str | None:
    """The skip pattern matching module `name` or a module containing it."""
    parts = name.split(".")
    scopes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return next((p for p in patterns for s in scopes if fnmatch.fnmatchcase(s, p)), None)


def _layer_bits(config: QuantConfig, name: str, is_edge: bool) -> tuple[int, int] | None:
    """Bits of one layer after the first/last policy and the overrides; None skips it."""
    bits = (config.w_bits, config.a_bits)
    if is_edge and config.edge_bits is not None:
        bits = (config.edge_bits, config.edge_bits)
    for rule in config.overrides:
        if fnmatch.fnmatchcase(name, rule["pattern"]):
            if rule.get("skip"):
                return None
            bits = (rule.get("w_bits", bits[0]), rule.get("a_bits", bits[1]))
    return bits


@functools.cache
def _tensor_reads(cls: type) -> frozenset[tuple[str, ...]]:
    """Attribute paths `self.a.b.weight` that `cls.forward` reads as tensors (not `.shape`)."""
    try:
        source = textwrap.dedent(inspect.getsource(inspect.unwrap(cls.forward)))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return frozenset()   # no source to read (built in, generated): calibrate still checks
    described = {id(node.value) for node in ast.walk(tree)
                 if isinstance(node, ast.Attribute) and node.attr in _METADATA}
    reads = set()
    for node in ast.walk(tree):
        path, cur = [], node
        while isinstance(cur, ast.Attribute):
            path.append(cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name) and cur.id == "self" and len(path) >= 2 \
                and id(node) not in described:
            reads.add(tuple(reversed(path)))
    return frozenset(reads)


def _direct_reads(model: nn.Module, names: set[str],
                  swapped: dict[str, type]) -> dict[str, str]:
    """Layer name -> which forward reads one of its parameters itself, for layers in `names`."""
    found: dict[str, str] = {}
    for owner, module in model.named_modules():
        cls = swapped.get(owner, type(module))
        for path in sorted(_tensor_reads(cls), key=lambda p: p[-1] != "weight"):
            child = ".".join(filter(None, (owner, *path[:-1])))
            if child in names and path[-1] in dict(model.get_submodule(child).named_parameters(
                    recurse=False)):
                found.setdefault(child, f"{cls.__name__}.forward reads self.{'.'.join(path)}")
    return found


def _skip_hint(names: list[str]) -> str:
    """Patterns naming `names`, with indices as wildcards (features.1.0.attn.qkv ->
    features.*.*.attn.qkv)."""
    patterns = dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", n) for n in names)
    return ",".join(patterns)


def plan_quantization(model: nn.Module, config: QuantConfig) -> QuantPlan:
    """The plan `quantize_model(model, config)` follows; raises ConfigError for layers it
    cannot quantize without being told (their weight is read directly by a parent)."""
    plan = QuantPlan((config.w_bits, config.a_bits))
    candidates: list[tuple[str, nn.Module, type]] = []
    float_parents: set[str] = set()
    for name, module in model.named_modules():
        if not (isinstance(module, nn.MultiheadAttention)
                or any(True for _ in module.parameters(recurse=False))):
            continue
        parent = name.rpartition(".")[0]
        target = quant_class(module)
        if parent in float_parents:
            target = f"computed inside the float nn.MultiheadAttention {parent!r}"
        if isinstance(target, str):
            plan.float.append(FloatLayer(name, type(module).__name__, target))
            if isinstance(module, nn.MultiheadAttention):
                float_parents.add(name)
        else:
            candidates.append((name, module, target))
    if not candidates:
        raise ConfigError("the model has no layer to quantize (Conv1d, Conv2d, Linear or "
                          "nn.MultiheadAttention)")
    names = [n for n, _, _ in candidates]
    patterns = [r["pattern"] for r in config.overrides]
    unused = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    unused += [p for p in config.skip if not any(_skipped(n, [p]) for n in names)]
    if unused:
        raise ConfigError(f"quant.skip/overrides: pattern(s) {unused} match no layer; layers "
                          f"are named like {names[0]!r}, {names[-1]!r}")
    edges = {names[0], names[-1]}
    kept = []
    for name, module, target in candidates:
        pattern = _skipped(name, config.skip)
        bits = None if pattern else _layer_bits(config, name, name in edges)
        if bits is None:
            why = f"skipped by quant.skip {pattern!r}" if pattern else "skipped by quant.overrides"
            plan.float.append(FloatLayer(name, type(module).__name__, why))
            continue
        kept.append((name, module, target, bits))
    swapped = {n: t for n, _, t, _ in kept}
    read = _direct_reads(model, set(swapped), swapped)
    if read:
        listed = "; ".join(f"{n} ({why})" for n, why in list(read.items())[:3])
        more = f"; and {len(read) - 3} more" if len(read) > 3 else ""
        raise ConfigError(f"cannot quantize layers whose weight their parent reads directly (the "
                          f"swapped layer would never run): {listed}{more}; leave them float with "
                          f"--skip '{_skip_hint(list(read))}' (quant.skip)")
    plan.quantized = [PlannedLayer(n, type(m).__name__, *bits, n in edges)
                      for n, m, _, bits in kept]
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    plan.float.sort(key=lambda r: order[r.name])
    if config.target == "onnxruntime":
        plan.residual_points = [n for n in residual_blocks(model)
                                if not _skipped(n, config.skip)]
    return plan
