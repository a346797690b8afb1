"""What retaining freed host memory (flatq.allocator) buys and costs on CPU training.

Runs the same training steps twice, each in a fresh process (the malloc setting is
process-wide and cannot be undone): once with glibc's default malloc, once with freed memory
retained as the `flatq` command does. Per step it records the wall time, the minor page
faults and the resident set size, and prints the ratios retained / default of the median step
time (second half of the steps: after the heap has grown) and of the peak resident size, and
whether the resident size still grows in the last quarter of the steps.

    .venv/bin/python bench/host_memory.py                        # FPQ ResNet-18, batch 128
Writes results/bench_host_memory.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

from flatq.allocator import retain_freed_host_memory
from machine import machine_info, run_in_fresh_process, run_main, save_report, status_mib
from step_time import batch, build_objective

MODES = ("glibc default", "retained")


def _run_child(mode: str, method: str, model_name: str, size: int, steps: int, threads: int,
               queue) -> None:
    applied = mode == "retained" and retain_freed_host_memory()
    torch.set_num_threads(threads)
    images, labels = batch(size, torch.device("cpu"))
    objective, optimizer = build_objective(method, model_name, images, torch.device("cpu"))
    records = []
    for _ in range(steps):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        objective.step(images, labels, optimizer)
        records.append({"seconds": time.perf_counter() - start,
                        "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
                        "rss_mib": status_mib("VmRSS")})
    queue.put({"retained": applied, "steps": records, "peak_rss_mib": status_mib("VmHWM")})


def run(mode: str, method: str, model_name: str, size: int, steps: int, threads: int) -> dict:
    result = run_in_fresh_process(_run_child, mode, method, model_name, size, steps, threads)
    later = result["steps"][steps // 2:]
    last_quarter = [s["rss_mib"] for s in result["steps"][-max(1, steps // 4):]]
    result["median_step_ms"] = 1e3 * statistics.median(s["seconds"] for s in later)
    result["median_page_faults"] = statistics.median(s["page_faults"] for s in later)
    result["rss_growth_last_quarter_mib"] = last_quarter[-1] - last_quarter[0]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--method", default="fpq", choices=("fp", "lsq", "fpq"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default="results/bench_host_memory.json")
    args = parser.parse_args(argv)
    report = {"machine": machine_info(), "loadavg_before": os.getloadavg(),
              "settings": {"model": args.model, "method": args.method, "batch": args.batch,
                           "steps": args.steps, "threads": args.threads, "bits": "w4a4"},
              "modes": {}}
    for mode in MODES:
        result = run(mode, args.method, args.model, args.batch, args.steps, args.threads)
        report["modes"][mode] = result
        print(f"{mode:13s}: step {result['median_step_ms']:.0f} ms, "
              f"{result['median_page_faults']:.0f} page faults per step, peak RSS "
              f"{result['peak_rss_mib']:.0f} MiB, RSS growth over the last quarter "
              f"{result['rss_growth_last_quarter_mib']:.0f} MiB")
    default, retained = (report["modes"][m] for m in MODES)
    report["ratios"] = {"step_time": retained["median_step_ms"] / default["median_step_ms"],
                        "peak_rss": retained["peak_rss_mib"] / default["peak_rss_mib"]}
    report["loadavg_after"] = os.getloadavg()
    print(f"retained / default: step time {report['ratios']['step_time']:.2f}x, peak RSS "
          f"{report['ratios']['peak_rss']:.2f}x (load {report['loadavg_before'][0]:.1f} -> "
          f"{report['loadavg_after'][0]:.1f})")
    save_report(report, args.out)
    return report


if __name__ == "__main__":
    run_main(main)
