"""What bench scripts share: where a result ran, its process memory, how a call is timed, how
a result is saved, how a mistake is reported, the command line of a bench over run folders."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flatq.errors import FlatqError


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


INT8_DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def int8_dot_product_flags() -> list[str]:
    """The CPU's int8 dot-product instruction sets (VNNI, AMX, Arm dot product): integer
    kernels run several times faster with them, so every speed result names them."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return []
    for line in cpuinfo.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in INT8_DOT_PRODUCT_FLAGS if flag in present]
    return []


def machine_info() -> dict:
    """CPU (and its int8 dot-product instructions), thread count, torch version and GPU (if
    any) of this run."""
    return {"cpu": cpu_model(), "int8_dot_product": int8_dot_product_flags(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def run_main(main: Callable[[], Any]) -> None:
    """Run a bench script's `main`: a user mistake (FlatqError: a missing data set, model or
    run) ends in one line on stderr and exit status 2, as in the flatq command; anything else
    is a bug and keeps its traceback."""
    try:
        main()
    except FlatqError as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def save_report(report: dict, path: str | Path) -> Path:
    """Write a bench report as indented JSON, creating its folder, and print where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {out}")
    return out


def per_run_command(doc: str, default_out: str) -> tuple[argparse.Namespace, dict]:
    """Parse the command line of a bench that measures run folders one at a time (`runs`, and
    `--out`, its JSON report) and return it with the report so far: the runs already in it
    are skipped, so a stopped call continues where it stopped. Single-threaded, as the runs
    it measures trained."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path(default_out))
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    return args, report


def run_name(run_dir: Path) -> str:
    """A run folder's name in a per-run report: probes/NAME, or long/w2a2/lsq/seed0 for grid
    runs."""
    parts = run_dir.parts
    return "/".join(parts[parts.index("converged") + 1:]) if "converged" in parts else run_dir.name


def print_load(report: dict) -> None:
    """Print the load averages a report recorded before and after its measurements."""
    print(f"load average (1, 5, 15 min): before {report['loadavg_before']}, "
          f"after {report['loadavg_after']}")


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: its peak) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_in_fresh_process(target: Callable, *args) -> dict:
    """Run target(*args, queue) in a spawned process and return what it puts on the queue:
    process-wide state (peak RSS, malloc settings) then belongs to that run alone."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=target, args=(*args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def sync(device: torch.device | None) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """One timed call: wall-clock seconds, this process's CPU seconds (all its threads, user
    and kernel), the kernel part of those, its minor page faults, and what the call returned.

    On a shared CPU the CPU time is the steadier measure: time spent descheduled while other
    processes run does not count (with several threads, their spin-waits do). Kernel time in a
    training step is mostly page faults on fresh memory (flatq.allocator)."""
    wall: float
    cpu: float
    system: float
    page_faults: int
    result: Any


def timed(fn: Callable, *args: Any, device: torch.device | None = None) -> Timing:
    """Call fn(*args) and time it, synchronizing `device` (CUDA) before and after."""
    sync(device)
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    result = fn(*args)
    sync(device)
    after = resource.getrusage(resource.RUSAGE_SELF)
    system = after.ru_stime - before.ru_stime
    return Timing(time.perf_counter() - start, after.ru_utime - before.ru_utime + system, system,
                  after.ru_minflt - before.ru_minflt, result)
