"""`flatq analyze hessian|noise|features RUN...`: flatness and robustness of finished runs.

Each writes one JSON file ({"kind": ..., "runs": [{"label": ..., ...}]}) that `flatq plot`
draws, and prints a short summary.
"""

from __future__ import annotations

import argparse

from ..analysis.noise import OUTPUTS
from ..analysis.params import PARAM_SETS
from ..analysis.reports import (features_entry, hessian_entry, noise_entry, open_runs, report,
                                write_report)
from ..train.loop import resolve_device, show_progress


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")


def _common(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders or model.pt files")
    parser.add_argument("--labels", default=None, help="comma-separated legend labels, one per "
                        "run [default: the run folder names]")
    parser.add_argument("--data-root", default=None, help="where the data set lives, if not "
                        "where the runs found it")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto [default: auto]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image choice and of "
                        "the random vectors or noise [default: 0]")
    parser.add_argument("--out", default=out, metavar="FILE.json",
                        help=f"where to write the result [default: {out}]")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="flatness and robustness analyses of finished runs",
                       description="Measure finished runs: Hessian trace and eigenvalues, output "
                       "variance under input noise, per-channel feature statistics. Each writes "
                       "JSON that `flatq plot` draws. Example: flatq analyze hessian runs/lsq "
                       "runs/fpq --out hessian.json && flatq plot hessian.json")
    kinds = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    h = kinds.add_parser("hessian", help="Hessian trace (Hutchinson), top eigenvalues, trace "
                         "per layer", description="Curvature of the mean cross-entropy over "
                         "fixed training batches (no augmentation), model in eval mode "
                         "(BatchNorm running statistics, quantizers active).")
    _common(h, "hessian.json")
    h.add_argument("--batches", type=int, default=4, help="training batches [default: 4]")
    h.add_argument("--batch-size", type=int, default=128, help="images per batch [default: 128]")
    h.add_argument("--samples", type=int, default=32, help="Hutchinson vectors per batch "
                   "[default: 32]")
    h.add_argument("--top-k", type=int, default=3, help="eigenvalues of largest magnitude to "
                   "find (0: none) [default: 3]")
    h.add_argument("--iters", type=int, default=100, help="most power iterations per "
                   "eigenvalue [default: 100]")
    h.add_argument("--tol", type=float, default=1e-3, help="power iteration stops when the "
                   "residual ||Hv - lambda v|| is at most tol * |lambda| [default: 1e-3]")
    h.add_argument("--params", choices=PARAM_SETS, default="weights", help="differentiate "
                   "w.r.t. the conv/linear weights or all trainable parameters [default: weights]")
    h.set_defaults(func=run_hessian)

    n = kinds.add_parser("noise", help="output variance under Gaussian input noise",
                         description="Add Gaussian noise of each std sigma to the normalized test "
                         "images, repeat, and average the variance of the outputs (paper Fig. 1).")
    _common(n, "noise.json")
    n.add_argument("--sigmas", type=_float_list, default=[0.0, 0.05, 0.1, 0.2, 0.3, 0.5],
                   help="noise std values [default: 0,0.05,0.1,0.2,0.3,0.5]")
    n.add_argument("--repeats", type=int, default=10, help="noisy copies per image "
                   "[default: 10]")
    n.add_argument("--images", type=int, default=500, help="test images [default: 500]")
    n.add_argument("--output", choices=OUTPUTS, default="logits", help="which outputs' variance: "
                   "logits or softmax probs [default: logits]")
    n.set_defaults(func=run_noise)

    f = kinds.add_parser("features", help="per-channel statistics of one layer's output",
                         description="Per-channel mean/std/min/max/percentiles and a histogram "
                         "of a conv or linear layer's output (before BatchNorm) on test images "
                         "(paper Figs. 3-4).")
    _common(f, "features.json")
    f.add_argument("--layer", required=True, help="module name of the layer, e.g. "
                   "stages.1.0.residual.0.0 (an unknown name lists valid ones)")
    f.add_argument("--images", type=int, default=256, help="test images [default: 256]")
    f.add_argument("--bins", type=int, default=100, help="histogram bins [default: 100]")
    f.set_defaults(func=run_features)


def _runs(args: argparse.Namespace):
    """Open each RUN in turn (one model in memory at a time)."""
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    return open_runs(args.runs, resolve_device(args.device), labels, args.data_root)


def _write(result: dict, out: str) -> None:
    print(f"-> {write_report(result, out)}")


def run_hessian(args: argparse.Namespace) -> None:
    entries = []
    for run in _runs(args):
        entry = hessian_entry(run, args.batches, args.batch_size, args.params, args.samples,
                              args.top_k, args.iters, args.tol, args.seed, show_progress(True))
        entries.append(entry)
        eig = ", ".join(f"{e['value']:.4g}{'' if e['converged'] else '?'} ± {e['residual']:.2g}"
                        for e in entry["eigenvalues"])
        print(f"{run.label}: Tr(H) = {entry['trace']['value']:.5g} ± "
              f"{entry['trace']['stderr']:.2g}  top eigenvalues [{eig}]  "
              f"({entry['num_params']} params, {args.samples} vectors x {args.batches} batches, "
              f"{sum(entry['seconds'].values()):.1f}s)")
    _write(report("hessian", entries, params=args.params), args.out)


def run_noise(args: argparse.Namespace) -> None:
    entries = []
    for run in _runs(args):
        entry = noise_entry(run, args.sigmas, args.repeats, args.images, args.output, args.seed)
        entries.append(entry)
        print(f"{run.label}: " + "  ".join(f"sigma {c['sigma']:g}: var {c['variance']:.4g} "
                                           f"(acc {c['acc']:.1f}%)" for c in entry["curve"]))
    _write(report("noise", entries, output=args.output, repeats=args.repeats, seed=args.seed),
           args.out)


def run_features(args: argparse.Namespace) -> None:
    entries = []
    for run in _runs(args):
        stats = features_entry(run, args.layer, args.images, args.bins)
        entries.append(stats)
        print(f"{run.label}: {stats['channels']} channels, channel means "
              f"{min(stats['mean']):.3g}..{max(stats['mean']):.3g}, channel stds "
              f"{min(stats['std']):.3g}..{max(stats['std']):.3g}")
    _write(report("features", entries, layer=args.layer), args.out)
