"""`flatq pretrain`: train a full-precision model from scratch."""

from __future__ import annotations

import argparse

from ..methods import PRETRAIN_METHODS
from ..runs import pretrain, pretrain_base
from ..train.distributed import is_main_process
from .options import (MODEL_HELP, add_method_flags, add_run_flags, add_section_flags,
                      build_run_config)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train a full-precision model",
                       description="Train a full-precision model from scratch (the teacher and "
                       "starting point of QAT). Example: flatq pretrain --model resnet8 --data "
                       "fashion_mnist --epochs 10 --lr 0.1 --out runs/fp")
    p.add_argument("--model", default=None, help=f"{MODEL_HELP} [default: resnet8]")
    p.add_argument("--pretrained", default=None, metavar="FILE", help="start from the weights "
                   "in FILE (a state_dict saved with torch.save, e.g. torchvision's .pth); its "
                   "keys and shapes must fit the model")
    add_run_flags(p)
    add_method_flags(p, PRETRAIN_METHODS, "ce")
    add_section_flags(p, ["data", "train"])
    p.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> None:
    config = build_run_config(args, "ce", base=pretrain_base(args.out, args.resume))
    summary = pretrain(config, args.out, resume=args.resume, overwrite=args.overwrite)
    if is_main_process():
        print(f"full-precision {config.model}: test acc {summary['test_acc']:.2f}%  -> {args.out}")
