"""`flatq ptq`: post-training quantization of a full-precision run (calibration only)."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..runs import load_teacher, ptq
from .options import MODEL_HELP, add_common_flags, add_section_flags, build_run_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ptq", help="post-training quantization of a full-precision run",
                       description="Quantize a trained full-precision model without training: "
                       "fixed min-max quantizers, ranges calibrated on --calib-images training "
                       "images. Example: flatq ptq runs/fp --bits w4a4 --range-method mse "
                       "--out runs/ptq")
    p.add_argument("run", nargs="?", metavar="RUN",
                   help="full-precision run folder or model.pt (or --model with --pretrained)")
    p.add_argument("--pretrained", default=None, metavar="FILE", help="instead of RUN: --model "
                   "with the weights in FILE (a state_dict, e.g. torchvision's ImageNet .pth), "
                   "evaluated and calibrated on the data given")
    p.add_argument("--model", default=None, help=f"with --pretrained: {MODEL_HELP}")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run folder to write (config.yaml, model.pt, summary.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--device", dest="train.device", default=argparse.SUPPRESS, metavar="DEVICE",
                   help="cpu, cuda, cuda:N or auto [default: auto]")
    add_common_flags(p)
    # PTQ always uses the fixed min-max quantizers: the learned families' options do not apply.
    add_section_flags(p, ["data"])
    add_section_flags(p, ["quant"], exclude=("quant.quantizer", "quant.weight_quantizer",
                                              "quant.input_quantizer", "quant.init"))
    p.set_defaults(func=run_ptq)


def run_ptq(args: argparse.Namespace) -> None:
    """A run's model with its data config (data flags override it), or --model with the
    --pretrained weights on the data the flags give."""
    if args.run and (args.pretrained or args.model):
        raise ConfigError("RUN brings its own model and weights; give either RUN or --model "
                          "with --pretrained FILE")
    if not args.run and not args.pretrained:
        raise ConfigError("ptq needs RUN (a full-precision run folder or model.pt) or --model "
                          "with --pretrained FILE")
    teacher, state = load_teacher(args.run) if args.run else (None, None)
    base = {"data": state["meta"]["data"]} if state else {}
    config = build_run_config(args, "ce", base=base, quantized=True)
    config.method = None
    if state:
        config.model = state["meta"]["model"]
    summary = ptq(config, teacher, state, args.out, overwrite=args.overwrite)
    print(f"{config.model} {summary['bits']} PTQ ({summary['range_method']}): test acc "
          f"{summary['test_acc']:.2f}% (full precision {summary['fp_test_acc']:.2f}%)  "
          f"-> {args.out}")
