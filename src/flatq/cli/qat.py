"""`flatq qat`: quantization-aware training from a full-precision run."""

from __future__ import annotations

import argparse

from ..methods import QAT_METHODS
from ..runs import qat, qat_start
from ..train.distributed import is_main_process
from .options import (MODEL_HELP, add_method_flags, add_run_flags, add_section_flags,
                      build_run_config)


def register(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("qat", help="quantization-aware training from a full-precision run",
                       description="Quantize a trained full-precision model and fine-tune it. "
                       "Example: flatq qat --from runs/fp --method fpq --bits w2a4 --out runs/fpq")
    q.add_argument("--from", dest="source", metavar="RUN",
                   help="full-precision run folder or model.pt: initialization and teacher "
                   "(with --resume: the run's own teacher unless given)")
    q.add_argument("--pretrained", default=None, metavar="FILE", help="instead of --from: the "
                   "teacher is --model with the weights in FILE (a state_dict, e.g. torchvision's "
                   "ImageNet .pth), trained on the data given")
    q.add_argument("--model", default=None, help=f"with --pretrained: {MODEL_HELP}")
    add_run_flags(q)
    add_method_flags(q, QAT_METHODS, "task")
    add_section_flags(q, ["data", "train", "quant"])
    q.set_defaults(func=run_qat)


def run_qat(args: argparse.Namespace) -> None:
    """The flags apply to the base `qat_start` gives (the run's own config with --resume)."""
    teacher, state, base = qat_start(args.out, args.source, args.resume, args.pretrained,
                                     args.model)
    config = build_run_config(args, "task", base=base, quantized=True)
    if state is not None:
        config.model = state["meta"]["model"]
    summary = qat(config, teacher, state, args.out, resume=args.resume, overwrite=args.overwrite)
    if is_main_process():
        print(f"{config.model} {config.quant.bits} {summary['method']}: test acc "
              f"{summary['test_acc']:.2f}% (full precision {summary['fp_test_acc']:.2f}%)  "
              f"-> {args.out}")
