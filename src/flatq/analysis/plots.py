"""Figures drawn from the analyses' JSON (and from a run's metrics.jsonl), never recomputed.

Every analysis file carries a "kind" and a list of "runs" (each with a "label"); `plot`
picks the drawing by kind. Figures are built on matplotlib's Agg canvas directly, so
importing this module changes no global matplotlib state.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..errors import ConfigError, DataError

METRICS_FILE = "metrics.jsonl"


def _figure(width: float, height: float, panels: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def _log_if_wide(ax, values: list[float], span: float = 100.0) -> None:
    """Log y-axis when the values' magnitudes span more than `span`x their median, so one
    outlier run (a degenerate channel can raise the trace 1000-fold) does not flatten every
    other bar; symmetric log when noisy estimates (Hutchinson) fall at or below zero."""
    magnitudes = [abs(v) for v in values if v != 0]
    if not magnitudes or max(magnitudes) <= span * float(np.median(magnitudes)):
        return
    if min(values) > 0:
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=float(np.median(magnitudes)))
    ax.set_ylabel(ax.get_ylabel() + " (log scale)")


def _offsets(count: int, width: float = 0.8) -> tuple[np.ndarray, float]:
    """Centre offsets of `count` grouped bars and the width of each."""
    bar = width / max(count, 1)
    return (np.arange(count) - (count - 1) / 2) * bar, bar


def draw_hessian(data: dict) -> Figure:
    """Trace with standard errors, top eigenvalues (when computed) and per-layer traces, one
    colour per run."""
    runs = data["runs"]
    with_eigen = any(r["eigenvalues"] for r in runs)
    fig, axes = _figure(15 if with_eigen else 10.5, 4.5, 3 if with_eigen else 2)
    ax_t, ax_l = axes[0], axes[-1]
    labels = [r["label"] for r in runs]
    ax_t.bar(labels, [r["trace"]["value"] for r in runs],
             yerr=[r["trace"]["stderr"] for r in runs], capsize=4,
             color=[f"C{i}" for i in range(len(runs))])
    ax_t.set(title="Hessian trace (Hutchinson, ±1 s.e.)", xlabel="run", ylabel="Tr(H)")
    if with_eigen:
        ax_e = axes[1]
        for i, r in enumerate(runs):
            values = [e["value"] for e in r["eigenvalues"]]
            ax_e.plot(range(1, len(values) + 1), values, "o-", color=f"C{i}", label=r["label"])
        ax_e.set(title="Top eigenvalues (power iteration)", xlabel="rank", ylabel="eigenvalue")
        ax_e.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_e.legend()
    offsets, bar = _offsets(len(runs))
    for i, r in enumerate(runs):
        x = np.arange(len(r["layers"])) + offsets[i]
        ax_l.bar(x, [layer["trace"] for layer in r["layers"]], bar,
                 yerr=[layer["stderr"] for layer in r["layers"]], color=f"C{i}", label=r["label"])
    names = [layer["name"] for layer in runs[0]["layers"]]
    ax_l.set_xticks(range(len(names)), names, rotation=75, fontsize=7)
    ax_l.set(title="Trace per layer", xlabel="layer", ylabel="Tr(H_layer)")
    ax_l.legend()
    _log_if_wide(ax_t, [r["trace"]["value"] for r in runs])
    _log_if_wide(ax_l, [layer["trace"] for r in runs for layer in r["layers"]])
    fig.suptitle(f"Curvature of the training loss w.r.t. {runs[0]['params']} (eval mode)")
    return fig


def draw_noise(data: dict) -> Figure:
    """Output variance against input-noise sigma, one curve per run (paper Fig. 1)."""
    fig, (ax,) = _figure(6.5, 4.5)
    for i, r in enumerate(data["runs"]):
        curve = r["curve"]
        ax.errorbar([c["sigma"] for c in curve], [c["variance"] for c in curve],
                    yerr=[c["stderr"] for c in curve], marker="o", capsize=3, color=f"C{i}",
                    label=r["label"])
    ax.set(title=f"Output variance under Gaussian input noise ({data['output']})",
           xlabel="input noise std sigma (normalized input)",
           ylabel=f"variance of {data['output']} (mean over outputs and images)")
    ax.legend()
    return fig


def draw_features(data: dict) -> Figure:
    """Per-channel ranges (1-99 / 25-75 percentiles, median) and the value histogram of one
    layer's output, one colour per run (paper Figs. 3-4)."""
    runs = data["runs"]
    fig, (ax_c, ax_h) = _figure(14, 4.5, 2)
    offsets, bar = _offsets(len(runs))
    for i, r in enumerate(runs):
        p = r["percentiles"]
        x = np.arange(r["channels"]) + offsets[i]
        ax_c.vlines(x, p["1"], p["99"], color=f"C{i}", linewidth=0.8)
        ax_c.vlines(x, p["25"], p["75"], color=f"C{i}", linewidth=max(bar * 6, 1.5),
                    label=r["label"])
        ax_c.plot(x, p["50"], "_", color="black", markersize=3)
        edges, counts = np.asarray(r["histogram"]["edges"]), np.asarray(r["histogram"]["counts"])
        density = counts / max(counts.sum(), 1) / np.diff(edges)
        ax_h.stairs(density, edges, color=f"C{i}", label=r["label"])
    ax_c.set(title="Per-channel distribution (bars: 25-75%, lines: 1-99%, ticks: median)",
             xlabel="output channel", ylabel="output value")
    ax_c.legend()
    ax_h.set(title="All values", xlabel="output value", ylabel="density", yscale="log")
    ax_h.legend()
    fig.suptitle(f"Output of layer {data['layer']} (before BatchNorm)")
    return fig


# Axis labels of the metrics the trackers log (others are shown by their own name).
METRIC_LABELS = {
    "hessian_trace": "Tr(H) of the task loss (Hutchinson)",
    "grad_norm": "||grad_w L|| of the whole objective",
    "task_grad_norm": "||grad_w CE|| of the task loss",
}

# (legend label, steps, values, standard errors or None)
Series = tuple[str, list[int], list[float], list[float] | None]


def read_metric(run: str | Path, metric: str) -> tuple[list[int], list[float],
                                                        list[float] | None]:
    """(steps, values, standard errors or None) of `metric` from a run folder's
    metrics.jsonl; the errors come from `<metric>_stderr` where every record has one."""
    path = Path(run)
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"{path}: no such metrics file (expected a run folder holding "
                        f"{METRICS_FILE})")
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not JSON lines ({exc})") from None
    rows = [r for r in records if metric in r and "step" in r]
    if not rows:
        found = sorted({k for r in records for k in r} - {"step", "epoch"})
        raise DataError(f"{path}: no record has {metric!r}; metrics there: {', '.join(found)}")
    error = f"{metric}_stderr"
    stderr = [float(r[error]) for r in rows] if all(error in r for r in rows) else None
    return [r["step"] for r in rows], [float(r[metric]) for r in rows], stderr


def draw_trajectories(series: list[Series], metric: str, log_y: bool = False) -> Figure:
    """One line per (label, steps, values, stderr) of `metric` against the training step,
    with a ±1 standard-error band where the errors are known (paper Figs. 2 and 5)."""
    fig, (ax,) = _figure(6.5, 4.5)
    for i, (label, steps, values, stderr) in enumerate(series):
        ax.plot(steps, values, marker=".", color=f"C{i}", label=label)
        if stderr is not None:
            mid, err = np.asarray(values), np.asarray(stderr)
            ax.fill_between(steps, mid - err, mid + err, color=f"C{i}", alpha=0.2,
                            linewidth=0)
    name = METRIC_LABELS.get(metric, metric)
    ax.set(title=f"{metric} during training" + (" (band: ±1 s.e.)" if any(
        s[3] is not None for s in series) else ""), xlabel="training step", ylabel=name)
    if log_y:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    return fig


DRAWERS: dict[str, Callable[[dict], Figure]] = {
    "hessian": draw_hessian, "noise": draw_noise, "features": draw_features}


def draw(data: dict) -> Figure:
    """The figure for an analysis result, chosen by its "kind"."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in DRAWERS:
        raise DataError(f"cannot plot kind {kind!r}; known kinds: {', '.join(DRAWERS)}")
    if not data.get("runs"):
        raise DataError(f"the {kind} analysis holds no runs")
    return DRAWERS[kind](data)


def check_output(path: str | Path) -> None:
    """Refuse an output path that cannot take a PNG, before anything is drawn."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"output {path}: only .png is written")
    if path.parent.exists() and not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: {path.parent} is not a folder")


def save(fig: Figure, path: str | Path) -> Path:
    check_output(path)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
