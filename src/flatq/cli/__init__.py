"""The `flatq` command: one subcommand module each, registered in COMMANDS.

User mistakes (FlatqError) end with one line on stderr and exit status 2; Ctrl-C ends with a
hint to resume. Anything else is a bug and keeps its traceback. Every command first has glibc
keep freed host memory for reuse (flatq.allocator), so that large-batch CPU steps stop
page-faulting in fresh memory (docs/speed.md).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import FlatqError
from ..allocator import retain_freed_host_memory
from . import analyze, demo, evaluate, export, plot, pretrain, ptq, qat

# Each module has `register(subparsers)`, which adds its parser with `func` set.
COMMANDS = [pretrain, qat, evaluate, demo, ptq, export, analyze, plot]


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming it (and --help), like every other
    flatq error, instead of the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="flatq", description="Low-bit quantization-aware training that seeks flat minima "
        "(FPQ, CR, DNQ, MEC-Quant and their baselines).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    retain_freed_host_memory()  # CPU training steps reuse pages instead of faulting them in
    try:
        args.func(args)
    except FlatqError as exc:
        print(f"flatq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flatq {args.command}: interrupted; the last complete epoch is saved, continue "
              "with --resume", file=sys.stderr)
        return 130
    return 0
