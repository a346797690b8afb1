"""`flatq ptq`: post-training quantization of a full-precision run (calibration only)."""

from __future__ import annotations

import argparse

from ..runs import ptq
from ..runs import load_teacher
from .options import add_common_flags, add_section_flags, build_run_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ptq", help="post-training quantization of a full-precision run",
                       description="Quantize a trained full-precision model without training: "
                       "fixed min-max quantizers, ranges calibrated on --calib-images training "
                       "images. Example: flatq ptq runs/fp --bits w4a4 --range-method mse "
                       "--out runs/ptq")
    p.add_argument("run", metavar="RUN", help="full-precision run folder or model.pt")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run folder to write (config.yaml, model.pt, summary.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--data-root", dest="data.root", default=argparse.SUPPRESS, metavar="DIR",
                   help="where the data set lives, if not where the run found it")
    p.add_argument("--device", dest="train.device", default=argparse.SUPPRESS, metavar="DEVICE",
                   help="cpu, cuda, cuda:N or auto [default: auto]")
    add_common_flags(p)
    # PTQ always uses the fixed min-max quantizers: the learned families' options do not apply.
    add_section_flags(p, ["quant"], exclude=("quant.quantizer", "quant.weight_quantizer",
                                              "quant.input_quantizer", "quant.init"))
    p.set_defaults(func=run_ptq)


def run_ptq(args: argparse.Namespace) -> None:
    teacher, state = load_teacher(args.run)
    config = build_run_config(args, "ce", base={"data": state["meta"]["data"]}, quantized=True)
    config.model, config.method = state["meta"]["model"], None
    summary = ptq(config, teacher, state, args.out, overwrite=args.overwrite)
    print(f"{config.model} {summary['bits']} PTQ ({summary['range_method']}): test acc "
          f"{summary['test_acc']:.2f}% (full precision {summary['fp_test_acc']:.2f}%)  "
          f"-> {args.out}")
