"""`flatq plot`: draw an analysis JSON, or training trajectories from run folders."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..analysis.sources import run_label
from ..errors import ConfigError, DataError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw an analysis result or a training trajectory as PNG",
                       description="Draw FILE.json written by `flatq analyze` (hessian, noise, "
                       "features), or a metric logged during training from one or more run "
                       "folders' metrics.jsonl (e.g. --metric hessian_trace after --track "
                       "hessian). Examples: flatq plot noise.json; flatq plot runs/lsq runs/fpq "
                       "--metric grad_norm -o gradnorm.png")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="one analysis FILE.json, or "
                   "run folders (or metrics.jsonl files)")
    p.add_argument("-o", "--out", default=None, metavar="FILE.png", help="image to write "
                   "[default: FILE.png beside FILE.json, or METRIC.png]")
    p.add_argument("--metric", default="hessian_trace", help="metric to draw from run folders: "
                   "hessian_trace, grad_norm, task_grad_norm, test_acc, ... "
                   "[default: hessian_trace]")
    p.add_argument("--labels", default=None, help="comma-separated legend labels for run "
                   "folders [default: the folder names]")
    p.add_argument("--log-y", action="store_true", help="logarithmic y axis for a trajectory "
                   "(runs whose values differ by orders of magnitude)")
    p.set_defaults(func=run_plot)


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a JSON text file (binary content)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def _draw_analysis(path: Path, draw) -> object:
    """The figure of one analysis file; a file that is not a whole analysis is named."""
    try:
        return draw(_load_json(path))
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(f"{path}: not a complete flatq analysis ({type(exc).__name__}: "
                        f"{exc})") from None


def run_plot(args: argparse.Namespace) -> None:
    # matplotlib takes half a second to import: only `flatq plot` pays for it
    from ..analysis.plots import check_output, draw, draw_trajectories, read_metric, save

    sources = [Path(s) for s in args.sources]
    analyses = [s for s in sources if s.suffix == ".json"]
    if analyses:
        if len(sources) > 1:
            raise ConfigError("plot one analysis FILE.json at a time (several runs go into one "
                              "file: flatq analyze ... RUN1 RUN2)")
        out = args.out or sources[0].with_suffix(".png")
        check_output(out)
        figure = _draw_analysis(sources[0], draw)
    else:
        labels = ([s.strip() for s in args.labels.split(",")] if args.labels
                  else [run_label(s) for s in sources])
        if len(labels) != len(sources):
            raise ConfigError(f"--labels gives {len(labels)} labels for {len(sources)} runs")
        figure = draw_trajectories([(label, *read_metric(s, args.metric))
                                    for label, s in zip(labels, sources)], args.metric,
                                   args.log_y)
        out = args.out or f"{args.metric}.png"
        check_output(out)
    print(f"-> {save(figure, out)}")
