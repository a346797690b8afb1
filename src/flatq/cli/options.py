"""Command-line flags generated from the config dataclasses, and the RunConfig they build.

Each config field becomes one flag (its help text and allowed values come from the field's
metadata), so flags, YAML keys and validation never drift apart. Precedence: defaults, then
the YAML file (--config), then flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..config import (METHOD_ALIASES, METHOD_CONFIGS, DataConfig, QuantConfig, RunConfig,
                      Section, TrainConfig, canonical_method, load_recipe, merge_sections,
                      parse_bits)
from ..errors import ConfigError
from ..models import available_models

SECTIONS: dict[str, type[Section]] = {"data": DataConfig, "train": TrainConfig,
                                      "quant": QuantConfig}
MODEL_HELP = (f"architecture: {', '.join(available_models())}; torchvision:NAME (any "
              "torchvision classification model, weights=None); or package.module:factory (your "
              "own: called with num_classes and in_channels where it takes them)")


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _help(f: dataclasses.Field, extra: str = "", default: str | None = None) -> str:
    text = f.metadata.get("help", "")
    if f.metadata.get("choices") and "one of" not in text:
        text += f" (one of: {', '.join(map(str, f.metadata['choices']))})"
    default = _default(f) if default is None else default
    return f"{text}{extra} [default: {default}]".replace("%", "%%")


def _add_field(group: argparse._ArgumentGroup, f: dataclasses.Field, dest: str, extra: str = "",
               type_hint: Any = None, default: str | None = None) -> None:
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS,
                              "help": _help(f, extra, default)}
    if type_hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["metavar"] = f.name.upper()
    group.add_argument(_flag(f), *f.metadata.get("aliases", ()), **kwargs)


def add_section_flags(parser: argparse.ArgumentParser, sections: list[str],
                      exclude: tuple[str, ...] = ()) -> None:
    """One flag per field of the named config sections (data, train, quant), but for the
    fields named in `exclude` (as 'section.field')."""
    for section in sections:
        cls = SECTIONS[section]
        group = parser.add_argument_group(f"{section} options")
        hints = cls.field_types()
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True) and f"{section}.{f.name}" not in exclude:
                _add_field(group, f, f"{section}.{f.name}", type_hint=hints[f.name])
        if section == "quant":
            group.add_argument("--bits", dest="bits", default=argparse.SUPPRESS, metavar="WxAy",
                               help="weight and activation bits of the inner layers, e.g. w4a4, "
                                    "w2a4, w2a2 (sets --w-bits and --a-bits)")


def add_method_flags(parser: argparse.ArgumentParser, methods: list[str], default: str) -> None:
    """--method, and one flag per option of the given methods (shared names share a flag)."""
    aliases = [alias for alias, name in METHOD_ALIASES.items() if name in methods]
    parser.add_argument("--method", default=argparse.SUPPRESS, choices=methods + aliases,
                        help=f"training objective (default: {default})"
                        + "".join(f"; {a} = {METHOD_ALIASES[a]}" for a in aliases))
    group = parser.add_argument_group("method options (each applies to the methods named)")
    defaults: dict[str, dict[str, Any]] = {}   # option -> {method: its default}
    fields: dict[str, tuple[dataclasses.Field, Any]] = {}
    for name in methods:
        cls = METHOD_CONFIGS[name]
        hints = cls.field_types()
        for f in dataclasses.fields(cls):
            defaults.setdefault(f.name, {})[name] = _default(f)
            fields.setdefault(f.name, (f, hints[f.name]))
    for key, (f, hint) in fields.items():
        owners = defaults[key]
        shared = len(set(map(repr, owners.values()))) == 1
        default = None if shared else ", ".join(f"{v} for {m}" for m, v in owners.items())
        _add_field(group, f, f"method.{key}", f" ({', '.join(owners)})", hint, default)


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """--out, --resume and --overwrite of the training commands, and --config."""
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder to write "
                        "(config.yaml, metrics.jsonl, checkpoint.pt, model.pt, summary.json)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from "
                        "its last complete checkpoint, with its config.yaml (flags given now "
                        "override it, e.g. --epochs to train longer)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run in --out")
    add_common_flags(parser)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="YAML recipe (e.g. configs/...); flags "
                        "given on the command line override its values")


def build_run_config(args: argparse.Namespace, default_method: str,
                     base: dict[str, Any] | None = None, quantized: bool = False) -> RunConfig:
    """Defaults <- `base` (e.g. the data config of a --from run) <- YAML <- flags."""
    raw = merge_sections(base or {}, {})
    if getattr(args, "config", None):
        raw = load_recipe(args.config, raw, default_method)
    given = vars(args)
    for key in ("model", "pretrained"):
        if given.get(key) is not None:
            raw[key] = given[key]
    method = raw.get("method") or {"name": default_method}
    method = {"name": method} if isinstance(method, str) else dict(method)
    if "method" in given:
        if canonical_method(given["method"]) != canonical_method(method.get("name", "")):
            method = {"name": given["method"]}
    if quantized:
        raw["quant"] = dict(raw.get("quant") or {})
    if "bits" in given:
        raw["quant"]["w_bits"], raw["quant"]["a_bits"] = parse_bits(given["bits"])
    for dest, value in given.items():
        if "." not in dest:
            continue
        section, key = dest.split(".", 1)
        if section == "method":
            cls = METHOD_CONFIGS.get(canonical_method(method["name"]))
            if cls is not None and key not in {f.name for f in dataclasses.fields(cls)}:
                raise ConfigError(f"option --{key.replace('_', '-')} does not apply to method "
                                  f"{method['name']!r}")
            method[key] = value
        else:
            raw.setdefault(section, {})
            raw[section] = {**(raw[section] or {}), key: value}
    raw["method"] = method
    return RunConfig.from_dict(raw)
