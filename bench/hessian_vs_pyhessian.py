"""flatq's Hutchinson Hessian trace against PyHessian's at equal samples (issue 4).

Both estimate Tr(H) of the mean cross-entropy of one model on one batch, w.r.t. all its
trainable parameters (PyHessian always takes every parameter that requires grad, so flatq runs
with params="all"), in eval mode, with the same number of Rademacher vectors. Timed:
  flatq:     hessian_report(model, [batch], "all", samples=N, top_k=0): the code path of
             `flatq analyze hessian --params all --top-k 0` (gradient graph + N products +
             per-layer sums + restoring buffers);
  pyhessian: hessian(model, cross_entropy, data=batch, cuda=False).trace(maxIter=N) (its
             constructor computes the gradient graph, so it is timed too).
The two run interleaved (A B, B A, ...) after a warm-up, so load from other processes hits
both alike; the ratio of medians is the headline, best-of-N and the ratio of median process
CPU times (less sensitive to other processes' load than wall time) are printed beside it.
Estimates: the pooled estimates are compared with their combined standard error; on the CPU,
the same seed also makes both draw the same Rademacher vectors (flatq's generator and the
global one are the same Mersenne Twister stream), so each repeat's two estimates should
coincide, which is reported; and one Hessian-vector product with a shared vector is compared
element-wise.

PyHessian is not a flatq dependency. Install it into the venv first:
    .venv/bin/pip install pyhessian
Its quirks, handled here and only here: it needs cuda=False on a CPU; trace(tol=...) stops
early when the running mean settles, so tol=-inf is passed to force exactly N vectors; it
draws vectors from the global torch RNG (seeded here before each call); it leaves .grad
tensors holding a graph (loss.backward(create_graph=True)), which are cleared after each
call; and that backward raises PyTorch's create_graph reference-cycle UserWarning, which is
silenced. It calls no deprecated torch function that fails on torch 2.x (it imports, unused,
torch.autograd.Variable).

    .venv/bin/python bench/hessian_vs_pyhessian.py                      # resnet8 w4a4, batch 64
    .venv/bin/python bench/hessian_vs_pyhessian.py --model resnet18 --bits fp32 --batch 32
    .venv/bin/python bench/hessian_vs_pyhessian.py --run runs/lsq        # a trained run

Writes results/bench_hessian.json (machine, load average, settings, times, estimates).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatq.analysis import hessian_report, model_hessian, select_params
from flatq.analysis.sources import fixed_batches
from flatq.config import DataConfig, QuantConfig, parse_bits
from flatq.models import available_models, build_model
from flatq.quant import calibrate, quantize_model
from flatq.runs import load_model, prepare_data

from machine import machine_info, run_main, save_report, timed

try:
    from pyhessian import hessian as PyHessian
except ImportError:
    raise SystemExit("PyHessian is not installed (it is not a flatq dependency); install it "
                     "with: .venv/bin/pip install pyhessian") from None

PYHESSIAN_NOTES = [
    "cuda=False passed (PyHessian defaults to cuda=True)",
    "trace(maxIter=N, tol=-inf) so that exactly N vectors are used (no early stop)",
    "global torch RNG seeded before each PyHessian call (it draws vectors from it)",
    ".grad cleared after each PyHessian call (it leaves gradients holding a graph)",
    "PyTorch's create_graph reference-cycle UserWarning silenced",
]


def build(args: argparse.Namespace) -> tuple[nn.Module, Tensor, Tensor, str]:
    """The model (eval mode, BatchNorm statistics from data) and one fixed batch; sets
    args.data to the data set used."""
    if args.run:
        model, state = load_model(args.run)
        args.data = state["meta"]["data"]["name"]
        data = prepare_data(DataConfig.from_dict(state["meta"]["data"]))
        described = f"{args.run} ({state['meta']['model']})"
    else:
        data = prepare_data(DataConfig(name=args.data, image_size=32, channels=3))
        torch.manual_seed(args.seed)
        model = build_model(args.model, num_classes=data.train.num_classes, in_channels=3)
        warm = fixed_batches(data.train, data.eval_pipeline, 4, args.batch, args.seed + 1,
                             torch.device("cpu"))
        with torch.no_grad():  # BatchNorm running statistics of real data, not 0 / 1
            model.train()
            for x, _ in warm:
                model(x)
        if args.bits != "fp32":
            w_bits, a_bits = parse_bits(args.bits)
            model = quantize_model(model, QuantConfig(w_bits=w_bits, a_bits=a_bits))
            calibrate(model, [warm[0][0]])
        described = f"{args.model} {args.bits} (random init, BatchNorm statistics from data)"
    (images, labels), = fixed_batches(data.train, data.eval_pipeline, 1, args.batch, args.seed,
                                      torch.device("cpu"))
    return model.eval(), images, labels, described


def run_flatq(model: nn.Module, images: Tensor, labels: Tensor, samples: int,
              seed: int) -> dict:
    report = hessian_report(model, [(images, labels)], "all", samples=samples, top_k=0,
                            seed=seed)
    return {"value": report["trace"]["value"], "stderr": report["trace"]["stderr"],
            "num_params": report["num_params"]}


def run_pyhessian(model: nn.Module, images: Tensor, labels: Tensor, samples: int,
                  seed: int) -> list[float]:
    torch.manual_seed(seed)
    try:
        values = PyHessian(model, F.cross_entropy, data=(images, labels),
                           cuda=False).trace(maxIter=samples, tol=-math.inf)
    finally:
        model.zero_grad(set_to_none=True)
    if len(values) != samples:
        raise RuntimeError(f"PyHessian used {len(values)} vectors, not {samples}")
    return values


def same_vector_check(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Largest |flatq Hv - PyHessian Hv| / max |Hv| for one shared Rademacher vector."""
    hessian = model_hessian(model, select_params(model, "all"), [(images, labels)])
    v = hessian.rademacher(torch.Generator().manual_seed(123))
    ours = hessian.matvec(v)
    hessian.release()
    try:
        py = PyHessian(model, F.cross_entropy, data=(images, labels), cuda=False)
        if [p.numel() for p in py.params] != hessian.numels:
            raise RuntimeError("PyHessian and flatq differentiate different parameters")
        theirs = torch.autograd.grad(py.gradsH, py.params, grad_outputs=hessian.split(v))
    finally:
        model.zero_grad(set_to_none=True)
    theirs = torch.cat([t.reshape(-1) for t in theirs])
    return float((ours - theirs).abs().max() / theirs.abs().max())


def measure(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, images, labels, described = build(args)
    load_before = os.getloadavg()
    hv_error = same_vector_check(model, images, labels)
    print(f"{described}, batch {len(images)}, {args.samples} vectors, {args.repeats} repeats; "
          f"same-vector Hv: max relative difference {hv_error:.2e}", flush=True)
    run_flatq(model, images, labels, 2, 0)  # warm-up (allocator, kernels)
    run_pyhessian(model, images, labels, 2, 0)
    times = {"flatq": [], "pyhessian": []}
    cpu_times = {"flatq": [], "pyhessian": []}
    flatq_runs, py_runs = [], []
    for r in range(args.repeats):
        order = ["flatq", "pyhessian"] if r % 2 == 0 else ["pyhessian", "flatq"]
        for name in order:
            seed = args.seed + 1000 * (r + 1)
            fn = run_flatq if name == "flatq" else run_pyhessian
            t = timed(fn, model, images, labels, args.samples, seed)
            seconds, cpu, out = t.wall, t.cpu, t.result
            (flatq_runs if name == "flatq" else py_runs).append(out)
            times[name].append(seconds)
            cpu_times[name].append(cpu)
        print(f"repeat {r + 1}/{args.repeats}: flatq {times['flatq'][-1]:.3f}s "
              f"(CPU {cpu_times['flatq'][-1]:.3f}s), PyHessian {times['pyhessian'][-1]:.3f}s "
              f"(CPU {cpu_times['pyhessian'][-1]:.3f}s)", flush=True)
    load_after = os.getloadavg()

    # Pool the repeats: flatq's repeats are independent estimates of equal size.
    f_value = statistics.mean(o["value"] for o in flatq_runs)
    f_stderr = math.sqrt(sum(o["stderr"] ** 2 for o in flatq_runs)) / len(flatq_runs)
    p = np.asarray(py_runs)
    p_value, p_stderr = float(p.mean()), float(p.std(ddof=1) / math.sqrt(p.size))
    combined = math.hypot(f_stderr, p_stderr)
    z = abs(f_value - p_value) / combined
    # Same seed, same CPU generator: both draw the same Rademacher vectors, so each repeat's
    # two estimates should coincide up to float rounding (reported, not assumed).
    paired = max(abs(o["value"] - float(np.mean(r))) for o, r in zip(flatq_runs, py_runs))
    median = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}
    cpu_median = {name: statistics.median(values) for name, values in cpu_times.items()}
    return {
        "machine": machine_info(), "loadavg_before": load_before, "loadavg_after": load_after,
        "settings": {"model": described, "batch": len(images), "samples": args.samples,
                     "repeats": args.repeats, "params": "all",
                     "num_params": flatq_runs[0]["num_params"], "data": args.data,
                     "seed": args.seed},
        "seconds": times, "median_seconds": median, "best_seconds": best,
        "flatq_over_pyhessian_time": median["flatq"] / median["pyhessian"],
        "flatq_over_pyhessian_time_best": best["flatq"] / best["pyhessian"],
        "cpu_seconds": cpu_times, "median_cpu_seconds": cpu_median,
        "flatq_over_pyhessian_cpu_time": cpu_median["flatq"] / cpu_median["pyhessian"],
        "trace": {"flatq": {"value": f_value, "stderr": f_stderr,
                            "vectors": args.samples * args.repeats},
                  "pyhessian": {"value": p_value, "stderr": p_stderr, "vectors": int(p.size)}},
        "per_repeat": [{"flatq": o["value"], "flatq_stderr": o["stderr"],
                        "pyhessian": float(np.mean(r))} for o, r in zip(flatq_runs, py_runs)],
        "paired_estimates_max_difference": paired,
        "difference_in_combined_stderr": z, "agree_within_3_stderr": bool(z < 3.0),
        "agree_within_1_flatq_stderr": bool(abs(f_value - p_value) < f_stderr),
        "same_vector_hv_max_relative_difference": hv_error,
        "pyhessian_notes": PYHESSIAN_NOTES,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet8", choices=available_models())
    parser.add_argument("--bits", default="w4a4", help="fp32 or WxAy [default: w4a4]")
    parser.add_argument("--data", default="fashion_mnist", help="data set of the batch "
                        "(Fashion-MNIST padded to 32x32x3; or synthetic) [default: fashion_mnist]")
    parser.add_argument("--run", default=None, help="a trained run folder or model.pt instead "
                        "of a random-init --model (its own data set is used)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16, help="Hutchinson vectors per call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", default="results/bench_hessian.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*create_graph=True.*reference cycle",
                            category=UserWarning)
    result = measure(args)
    save_report(result, args.out)
    m, t = result["median_seconds"], result["trace"]
    b = result["best_seconds"]
    print(f"median time: flatq {m['flatq']:.3f}s, PyHessian {m['pyhessian']:.3f}s; "
          f"flatq / PyHessian = {result['flatq_over_pyhessian_time']:.3f} (best of "
          f"{args.repeats}: {b['flatq']:.3f}s / {b['pyhessian']:.3f}s = "
          f"{result['flatq_over_pyhessian_time_best']:.3f}); median process CPU time: flatq / "
          f"PyHessian = {result['flatq_over_pyhessian_cpu_time']:.3f}")
    print(f"Tr(H): flatq {t['flatq']['value']:.5g} ± {t['flatq']['stderr']:.3g} "
          f"({t['flatq']['vectors']} vectors), PyHessian {t['pyhessian']['value']:.5g} ± "
          f"{t['pyhessian']['stderr']:.3g} ({t['pyhessian']['vectors']} vectors); difference "
          f"{result['difference_in_combined_stderr']:.2f} combined s.e. -> "
          f"{'agree' if result['agree_within_3_stderr'] else 'DISAGREE'} (within 3 s.e.); "
          f"within 1 flatq s.e.: {'yes' if result['agree_within_1_flatq_stderr'] else 'no'}; "
          f"paired repeats differ by at most {result['paired_estimates_max_difference']:.2g}")
    print("PyHessian handled with: " + "; ".join(PYHESSIAN_NOTES))


if __name__ == "__main__":
    run_main(main)
