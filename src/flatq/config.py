"""Configuration: plain dataclasses, validated, read from YAML and overridable by flags.

Every field carries its help text and its allowed values in `field(metadata=...)`; the same
metadata drives validation (errors name the field and what is allowed), YAML loading (unknown
keys are refused) and the command-line flags (one flag per field, generated in the CLI).
Method-specific configs live beside their methods and register here by name; `import flatq`
imports the methods, so every method is known once any part of flatq is imported.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .atomic import write_text_atomic
from .errors import ConfigError


def option(default: Any, help: str, *, choices: tuple | None = None,
           low: float | None = None, high: float | None = None, flag: str | None = None,
           aliases: tuple[str, ...] = (), cli: bool = True) -> Any:
    """A config field with its documentation and its allowed values (`aliases`: more flags)."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "flag": flag,
            "aliases": aliases, "cli": cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {' or '.join(_describe(a) for a in args)}, "
                          f"got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, item, where) for v in value]
    if tp is Any or origin is dict or tp is dict:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no",
                                                         "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} at {where}")


class Section:
    """Base of every config dataclass: validation, dict round trip, field lookup."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    def validate(self) -> None:
        hints = self.field_types()
        for f in dataclasses.fields(self):
            where = f"{self.section}.{f.name}" if self.section else f.name
            value = coerce(getattr(self, f.name), hints[f.name], where)
            object.__setattr__(self, f.name, value)
            meta = f.metadata
            if value is None:
                continue
            choices = meta.get("choices")
            items = value if isinstance(value, list) else [value]
            if choices is not None and any(v not in choices for v in items):
                bad = next(v for v in items if v not in choices)
                raise ConfigError(f"{where}: {bad!r} is not one of {', '.join(map(str, choices))}")
            if any(isinstance(v, float) and not math.isfinite(v) for v in items):
                raise ConfigError(f"{where}: {value} is not a finite number")
            low, high = meta.get("low"), meta.get("high")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if (low is not None and value < low) or (high is not None and value > high):
                    span = (f"{low if low is not None else '-inf'}.."
                            f"{high if high is not None else 'inf'}")
                    raise ConfigError(f"{where}: {value} is outside the allowed range {span}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, base: "Section | None" = None):
        """Build from a mapping; keys not among the fields are refused by name."""
        values = dict(values or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            where = f" in {cls.section}" if cls.section else ""
            raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))}{where}; allowed: "
                              f"{', '.join(names)}")
        start = base.to_dict() if base is not None else {}
        start.update(values)
        return cls(**start)


def parse_bits(text: str) -> tuple[int, int]:
    """'w4a4' -> (4, 4). Both widths must lie in 2..8."""
    match = re.fullmatch(r"\s*[wW](\d+)\s*[aA](\d+)\s*", str(text))
    if not match:
        raise ConfigError(f"bits: expected the form wXaY (e.g. w4a4, w2a4), got {text!r}")
    w, a = int(match.group(1)), int(match.group(2))
    for name, b in (("weight", w), ("activation", a)):
        if not 2 <= b <= 8:
            raise ConfigError(f"bits: {name} bit width {b} is outside 2..8 in {text!r}")
    return w, a


def check_device(name: str) -> str:
    """A device name flatq accepts: auto, cpu, cuda or cuda:N (availability is checked when
    the device is used)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(name)):
        raise ConfigError(f"device: {name!r} is not a device; use cpu, cuda, cuda:N or auto")
    return str(name)


@dataclass
class DataConfig(Section):
    section: ClassVar[str] = "data"
    name: str = option("fashion_mnist", "data set: cifar10, cifar100, fashion_mnist, digits, "
                       "synthetic, imagefolder (DIR/train/CLASS/*.jpg and DIR/val/CLASS/..., "
                       "read from disk as it trains)", flag="--data")
    root: str | None = option(None, "folder holding the data set (CIFAR: the folder containing "
                              "cifar-10-batches-py; Fashion-MNIST: the idx files; imagefolder: "
                              "the folder holding train/ and val/; default: FLATQ_DATA or the "
                              "Debian package's folder)", flag="--data-root")
    image_size: int | None = option(None, "pad images to this square size (e.g. 32 for the "
                                    "CIFAR models on 28x28 Fashion-MNIST); imagefolder: the "
                                    "crop size (default: the model's ImageNet input size, "
                                    "else 224)", low=8, high=1024)
    channels: int | None = option(None, "repeat a gray channel to this many (3 for CIFAR models)",
                                  choices=(1, 3))
    augment: bool = option(True, "random crop with padding and (where sensible) horizontal "
                           "flip; imagefolder: RandomResizedCrop and flip")
    workers: int | None = option(None, "imagefolder: DataLoader worker processes per rank that "
                                 "decode images (default: min(8, CPUs per rank)); in-memory "
                                 "data sets need none", low=0, high=256)


@dataclass
class TrainConfig(Section):
    section: ClassVar[str] = "train"
    epochs: int = option(200, "number of training epochs", low=1)
    batch_size: int = option(256, "global batch size (split across DDP ranks)", low=1)
    lr: float = option(0.01, "initial learning rate of SGD", low=0.0)
    momentum: float = option(0.9, "SGD momentum", low=0.0, high=1.0)
    weight_decay: float = option(5e-4, "weight decay of weights (not of step sizes or zero "
                                 "points; PACT's alpha gets it as its L2 penalty)", low=0.0)
    nesterov: bool = option(False, "use Nesterov momentum")
    bn_freeze: float = option(0.0, "fraction of training at its end during which every "
                              "BatchNorm normalizes with, and keeps, its running statistics "
                              "(eval mode), so the last steps train the network that is "
                              "evaluated (torch.ao's QAT recipe); with --bn-images they are "
                              "re-estimated first", low=0.0, high=1.0)
    dampen: float = option(0.0, "oscillation dampening (Nagel et al. 2022): final weight of a "
                           "loss pulling each latent weight to the centre of its quantization "
                           "bin, 0 for the first quarter of training, then a cosine ramp; 0 "
                           "(default) off, the paper's value 0.1 (docs/soundness.md)", low=0.0)
    freeze_oscillations: float = option(0.0, "iterative freezing of oscillating weights (Nagel "
                                        "et al. 2022): final frequency threshold (oscillations "
                                        "per step) above which a weight of at most 4 bits on a "
                                        "learned grid is frozen to its most common recent "
                                        "integer; 0 (default) off (docs/soundness.md)",
                                        low=0.0, high=1.0)
    freeze_momentum: float = option(0.01, "momentum of the moving averages behind "
                                    "--freeze-oscillations (about 1/horizon in steps; the "
                                    "paper's ImageNet runs use 0.001)", low=0.0, high=1.0)
    quantizer_lr: float = option(1.0, "learning rate of the quantizers' step sizes, offsets and "
                                 "clipping values, as a multiple of --lr", low=0.0)
    warmup_epochs: int = option(0, "linear learning-rate warm-up before the cosine decay", low=0)
    seed: int = option(0, "random seed (data order, augmentation, noise, initialization)", low=0,
                       high=2**32 - 1)
    device: str = option("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    amp: bool = option(False, "mixed precision (bfloat16 autocast) on CUDA")
    test_batch_size: int = option(512, "batch size for evaluation", low=1)
    eval_every: int = option(1, "evaluate on the test set every N epochs (always after the "
                             "last); evaluation does not change training, only what is logged",
                             low=1)
    channels_last: bool = option(False, "keep the models' 4-D weights and activations in "
                                 "channels-last (NHWC) memory layout: faster convolutions on "
                                 "CPU (oneDNN) and on CUDA tensor cores; results differ from the "
                                 "default layout by float rounding only")
    max_steps_per_epoch: int | None = option(None, "cut every epoch after this many steps "
                                             "(quick experiments)", low=1)
    track: list[str] = option([], "trajectories to log during training: hessian, gradnorm",
                              choices=("hessian", "gradnorm"))
    track_every: int = option(100, "log tracked quantities every N steps", low=1)
    checkpoint_every_steps: int | None = option(None, "also checkpoint every N steps (besides "
                                                "every epoch)", low=1)
    progress: bool = option(True, "show progress bars (only on a terminal)")
    sync_bn: bool = option(False, "under torchrun, normalize with the statistics of the global "
                           "batch (SyncBatchNorm; CUDA only) instead of each rank's own")

    def validate(self) -> None:
        super().validate()
        check_device(self.device)


# Names of the registered quantizer families, filled by `flatq.quant.quantizers` (which
# `import flatq` imports): the choices of quant.quantizer / weight_quantizer / input_quantizer.
QUANTIZER_NAMES: list[str] = []


@dataclass
class QuantConfig(Section):
    section: ClassVar[str] = "quant"
    w_bits: int = option(4, "weight bit width of the inner layers", low=2, high=8)
    a_bits: int = option(4, "input (activation) bit width of the inner layers", low=2, high=8)
    quantizer: str = option("lsq", "quantizer family of weights and inputs: lsq (learned "
                            "step), lsq+ (learned step and offset; LSQ weights), pact (learned "
                            "clipping; min-max weights), minmax (fixed ranges)",
                            choices=QUANTIZER_NAMES)
    weight_quantizer: str | None = option(None, "the weights' quantizer family when it differs "
                                          "from --quantizer (e.g. lsq weights with pact inputs)",
                                          choices=QUANTIZER_NAMES)
    input_quantizer: str | None = option(None, "the inputs' quantizer family when it differs "
                                         "from --quantizer", choices=QUANTIZER_NAMES)
    lsqplus_offset: str = option("integer", "LSQ+'s learned offset beta in the forward pass: "
                                 "integer (as the zero point round(-beta / s), exportable) or "
                                 "continuous (beta itself, as the LSQ+ paper; with its min-max "
                                 "init beta = min, not widened to contain 0)",
                                 choices=("integer", "continuous"))
    pact_weights: str = option("minmax", "weight quantizer of --quantizer pact: minmax (per "
                               "channel, the current weights' range every step) or dorefa (the "
                               "PACT paper's: DoReFa's 2 quantize_k(tanh(w) / (2 max|tanh(w)|) + "
                               "1/2) - 1 on the inner layers; the first and last layer keep "
                               "minmax: the classifier has no BatchNorm to absorb DoReFa's "
                               "[-1, 1] weight scale)", choices=("minmax", "dorefa"))
    symmetric_weights: bool = option(False, "signed weights with zero point 0 (default: the "
                                     "paper's asymmetric form with a calibrated zero point)")
    symmetric_inputs: bool = option(False, "signed inputs with zero point 0")
    init: str = option("minmax", "initial step size: minmax (paper Eq. 5) or lsq "
                       "(2 mean|x| / sqrt(Qp), Qp the grid's levels above the zero point, which "
                       "splits the grid as the data's range)", choices=("minmax", "lsq"))
    edge_bits: int | None = option(8, "bit width of the first and last layer (none: same as "
                                   "the others)", low=2, high=8)
    edge_weights: str = option("minmax", "weight quantizer of the first and last layer: "
                               "minmax (the current weights' range every step, full 8-bit "
                               "resolution, no step size to learn, so no channel can die) or "
                               "learned (the family's own, e.g. LSQ step sizes; a min-max-"
                               "initialized 8-bit step can be overshot by one update and kill "
                               "its channel, docs/soundness.md)", choices=("learned", "minmax"))
    eight_bit_weights: str = option("minmax", "weight quantizer of the other layers at 8 "
                                    "bits (by --w-bits or an override): minmax (as "
                                    "--edge-weights minmax; torch.ao's QAT default) or "
                                    "learned (the family's own: a min-max-initialized 8-bit "
                                    "step dies as the first layer's did, docs/soundness.md)",
                                    choices=("learned", "minmax"))
    edge_init: str | None = option(None, "initial step size of learned first and last layer "
                                   "weights: minmax, lsq (LSQ's 2 mean|w| / sqrt(Qp), which "
                                   "also keeps channels alive but uses ~14 of the 8-bit levels) "
                                   "or none (as --init)", choices=("minmax", "lsq"))
    skip: list[str] = option([], "modules to leave float: names or fnmatch patterns, comma "
                             "separated (e.g. 'features.*.attn'); a pattern naming a module "
                             "leaves every layer inside it float too")
    overrides: list[dict] = option([], "per-layer rules [{pattern: 'layer4.*', w_bits: 8, "
                                   "a_bits: 8} or {pattern: ..., skip: true}]", cli=False)
    calib_images: int = option(100, "training images used to calibrate ranges", low=1)
    calib_seed: int = option(0, "seed of the calibration subset", low=0)
    bn_images: int = option(12800, "re-estimate BatchNorm running statistics from this many "
                            "clean training images (no augmentation, no SFP noise; at most half "
                            "the training set) after QAT, and where --bn-freeze freezes them; "
                            "0 keeps the running averages of training", low=0)
    bn_check: int = option(10000, "keep the statistics re-estimated after QAT only if the "
                           "accuracy on this many further training images (not those estimated "
                           "from; at most the rest of the training set) does not fall; 0 keeps "
                           "them unconditionally", low=0)
    range_method: str = option("minmax", "how calibration sets ranges: minmax, percentile "
                               "(inputs clipped to the [100-p, p] percentiles; weights min-max) "
                               "or mse (the clipping range with least quantization MSE, weights "
                               "per channel too)", choices=("minmax", "percentile", "mse"))
    percentile: float = option(99.99, "p of --range-method percentile", low=50.0, high=100.0)
    target: str = option("paper", "what QAT models: paper (the papers' fake-quant points: "
                         "each layer's input and weight) or onnxruntime (also what onnxruntime's "
                         "integer kernels execute: symmetric per-channel weights on [-qmax, "
                         "qmax], BatchNorm folded, conv outputs requantized; see "
                         "docs/export.md)", choices=("paper", "onnxruntime"))

    def weight_init(self, edge: bool) -> str:
        """Initial step-size rule of a layer's weights (`edge`: the first or last layer)."""
        return self.edge_init if edge and self.edge_init else self.init

    def validate(self) -> None:
        super().validate()
        if self.target == "onnxruntime" and self.symmetric_inputs:
            raise ConfigError("quant.symmetric_inputs does not go with quant.target "
                              "onnxruntime: its integer convolutions take uint8 activations "
                              "with a zero point")
        for rule in self.overrides:
            if not isinstance(rule, dict) or "pattern" not in rule:
                raise ConfigError(f"quant.overrides: each rule needs a 'pattern', got {rule!r}")
            unknown = set(rule) - {"pattern", "w_bits", "a_bits", "skip"}
            if unknown:
                raise ConfigError(f"quant.overrides: unknown key(s) {sorted(unknown)} in {rule!r}; "
                                  "allowed: pattern, w_bits, a_bits, skip")
            for key in ("w_bits", "a_bits"):
                if key in rule and not (isinstance(rule[key], int) and 2 <= rule[key] <= 8):
                    raise ConfigError(f"quant.overrides: {key} must be in 2..8 in {rule!r}")

    @property
    def bits(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"

    @property
    def weight_family(self) -> str:
        """The weights' quantizer family: `weight_quantizer`, or `quantizer` when unset."""
        return self.weight_quantizer or self.quantizer

    @property
    def input_family(self) -> str:
        """The inputs' quantizer family: `input_quantizer`, or `quantizer` when unset."""
        return self.input_quantizer or self.quantizer


@dataclass
class MethodConfig(Section):
    """Base of the per-method configs; subclasses set `name` (and any older `aliases` that
    configs and checkpoints may still say) and register themselves."""
    section: ClassVar[str] = "method"
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()


METHOD_CONFIGS: dict[str, type[MethodConfig]] = {}
METHOD_ALIASES: dict[str, str] = {}     # an accepted older name -> the method's name


def register_method_config(cls: type[MethodConfig]) -> type[MethodConfig]:
    METHOD_CONFIGS[cls.name] = cls
    METHOD_ALIASES.update((alias, cls.name) for alias in cls.aliases)
    return cls


def canonical_method(name: str) -> str:
    """The method's own name for `name`, which may be one of its aliases (e.g. lsq -> task)."""
    return METHOD_ALIASES.get(name, name)


def method_config(name: str, values: dict[str, Any] | None = None) -> MethodConfig:
    """The config of method `name` (or an alias of it) with `values` over its defaults.

    Raises:
        ConfigError: an unknown method, or values it does not accept.
    """
    name = canonical_method(name)
    if name not in METHOD_CONFIGS:
        raise ConfigError(f"unknown method {name!r}; available: "
                          f"{', '.join(sorted(METHOD_CONFIGS))}")
    return METHOD_CONFIGS[name].from_dict(values)


@dataclass
class RunConfig:
    """Everything one run needs; what `config.yaml` in a run folder holds."""
    model: str = "resnet8"
    data: DataConfig = field(default_factory=DataConfig)
    # A local weights file (state_dict) the model starts from: pretrain's initialization,
    # or qat's teacher when no --from run is given.
    pretrained: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig | None = None
    method: MethodConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "data": self.data.to_dict(),
                               "train": self.train.to_dict()}
        if self.pretrained is not None:
            out["pretrained"] = self.pretrained
        if self.quant is not None:
            out["quant"] = self.quant.to_dict()
        if self.method is not None:
            out["method"] = {"name": self.method.name, **self.method.to_dict()}
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        if not isinstance(values, dict):
            raise ConfigError("a config must be a mapping of sections, got "
                              f"{type(values).__name__}")
        allowed = ("model", "pretrained", "data", "train", "quant", "method")
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ConfigError(f"unknown top-level key(s) {', '.join(map(repr, unknown))}; "
                              f"allowed: {', '.join(allowed)}")
        model = coerce(values.get("model", cls.model), str, "model")
        pretrained = coerce(values.get("pretrained"), str | None, "pretrained")
        sections = {}
        for key in ("data", "train", "quant"):
            raw = values.get(key)
            if raw is not None and not isinstance(raw, dict):
                raise ConfigError(f"{key}: expected a mapping, got {raw!r}")
        sections["data"] = DataConfig.from_dict(values.get("data"))
        sections["train"] = TrainConfig.from_dict(values.get("train"))
        # An empty mapping ({}: qat with no quant flag) means the defaults, not "unquantized".
        sections["quant"] = (QuantConfig.from_dict(values["quant"])
                             if values.get("quant") is not None else None)
        method = values.get("method")
        if method is not None:
            if isinstance(method, str):
                method = {"name": method}
            if not isinstance(method, dict) or "name" not in method:
                raise ConfigError("method: expected a mapping with a 'name' key")
            method = dict(method)
            method = method_config(method.pop("name"), method)
        return cls(model=model, pretrained=pretrained, method=method, **sections)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file; a missing or malformed file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from None
    return data or {}


def merge_sections(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`: a section that is a mapping in both merges key by key, any
    other value replaces; neither argument is changed."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def load_recipe(path: str | Path, base: dict[str, Any] | None = None,
                default_method: str = "ce") -> dict[str, Any]:
    """A YAML recipe merged over `base` (a config mapping), as a mapping flags can still
    override. The file must be valid on its own (with `default_method` when it names none).

    Raises:
        ConfigError: the file is missing, not YAML, not a mapping of sections, or invalid;
            the message starts with the path.
    """
    loaded = load_yaml(path)
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections")
    raw = merge_sections(base or {}, loaded)
    try:  # the file must be valid on its own, even where flags override it
        RunConfig.from_dict({**raw, "method": raw.get("method") or default_method})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return raw


def save_yaml(config: RunConfig, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
