"""`flatq pretrain` and `flatq qat`."""

from __future__ import annotations

import argparse

from ..methods import PRETRAIN_METHODS, QAT_METHODS
from ..models import available_models
from ..train.distributed import is_main_process
from ..runs import pretrain, pretrain_base, qat, qat_start
from .options import add_common_flags, add_method_flags, add_section_flags, build_run_config


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder to write "
                        "(config.yaml, metrics.jsonl, checkpoint.pt, model.pt, summary.json)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from "
                        "its last complete checkpoint, with its config.yaml (flags given now "
                        "override it, e.g. --epochs to train longer)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    add_common_flags(parser)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train a full-precision model",
                       description="Train a full-precision model from scratch (the teacher and "
                       "starting point of QAT). Example: flatq pretrain --model resnet8 --data "
                       "fashion_mnist --epochs 10 --lr 0.1 --out runs/fp")
    p.add_argument("--model", default=None, help=f"architecture: {', '.join(available_models())} "
                   "[default: resnet8]")
    _add_run_flags(p)
    add_method_flags(p, PRETRAIN_METHODS, "ce")
    add_section_flags(p, ["data", "train"])
    p.set_defaults(func=run_pretrain)

    q = sub.add_parser("qat", help="quantization-aware training from a full-precision run",
                       description="Quantize a trained full-precision model and fine-tune it. "
                       "Example: flatq qat --from runs/fp --method fpq --bits w2a4 --out runs/fpq")
    q.add_argument("--from", dest="source", metavar="RUN",
                   help="full-precision run folder or model.pt: initialization and teacher "
                   "(with --resume: the run's own teacher unless given)")
    _add_run_flags(q)
    add_method_flags(q, QAT_METHODS, "task")
    add_section_flags(q, ["data", "train", "quant"])
    q.set_defaults(func=run_qat)


def run_pretrain(args: argparse.Namespace) -> None:
    config = build_run_config(args, "ce", base=pretrain_base(args.out, args.resume))
    summary = pretrain(config, args.out, resume=args.resume, overwrite=args.overwrite)
    if is_main_process():
        print(f"full-precision {config.model}: test acc {summary['test_acc']:.2f}%  -> {args.out}")


def run_qat(args: argparse.Namespace) -> None:
    """The flags apply to the base `qat_start` gives (the run's own config with --resume)."""
    teacher, state, base = qat_start(args.out, args.source, args.resume)
    config = build_run_config(args, "task", base=base, quantized=True)
    config.model = state["meta"]["model"]
    summary = qat(config, teacher, state, args.out, resume=args.resume, overwrite=args.overwrite)
    if is_main_process():
        print(f"{config.model} {config.quant.bits} {summary['method']}: test acc "
              f"{summary['test_acc']:.2f}% (full precision {summary['fp_test_acc']:.2f}%)  "
              f"-> {args.out}")
