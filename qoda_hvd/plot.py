"""``qoda-hvd plot``: the side-by-side of a run as a picture (loss and bytes sent against steps).

One concept: reading what the demo and the examples write, and drawing it. It reads

- ``qoda-hvd demo --json FILE``: one line per method (``runs[i]["series"]``: rank 0's training
  loss and the megabytes it sent, step by step);
- an example's ``metrics.csv`` (``examples/*.py --out DIR``): one line per file, labelled by its
  directory, so ``qoda-hvd plot runs/a/metrics.csv runs/b/metrics.csv`` compares two runs;

and writes one PNG with two panels: the metric against the step (``loss`` by default, or the
first of ``wasserstein`` and ``loss_d`` a GAN logs; ``--metric`` picks another column) and the
megabytes one rank sent against the step.

matplotlib is imported only when drawing; without it the command says which extra installs it
(``examples``, which ``make setup`` installs, or ``plot``).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["Series", "build_parser", "load_series", "main", "plot_files"]

#: Metric columns tried in order when none is named (the LM's, then the GAN's).
DEFAULT_METRICS = ("loss", "wasserstein", "loss_d")
_MISSING_MATPLOTLIB = ("qoda-hvd plot needs matplotlib, which is not installed: "
                       "pip install 'qoda_hvd[examples]' (or 'qoda_hvd[plot]'); `make setup` "
                       "installs the examples extra")


@dataclass
class Series:
    """One line of each panel: a method of the demo, or one example run.

    Attributes:
        label: the legend's text.
        steps: the step of each point.
        columns: values by column name, each as long as ``steps`` (NaN where not logged).
        source: the file it was read from.
    """

    label: str
    steps: list[float]
    columns: dict[str, list[float]] = field(default_factory=dict)
    source: str = ""


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _from_demo(data: dict, path: Path) -> list[Series]:
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"{path}: a demo JSON holds a non-empty 'runs' list; this one does not")
    out = []
    for run in runs:
        series = run.get("series")
        if not series:
            raise ValueError(f"{path}: run {run.get('name')!r} has no per-step series (written by "
                             f"an older demo): run `qoda-hvd demo --json FILE` again")
        out.append(Series(label=run.get("label") or run.get("name", "?"),
                          steps=[float(s) for s in series["step"]],
                          columns={"loss": [float(v) for v in series["loss"]],
                                   "mb_sent": [float(v) for v in series["mb_sent"]]},
                          source=str(path)))
    return out


def _from_csv(path: Path) -> Series:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "step" not in rows[0]:
        raise ValueError(f"{path}: expected an example's metrics.csv (a 'step' column and at "
                         f"least one row)")
    columns = {name: [_number(r[name]) for r in rows] for name in rows[0] if name != "step"}
    if "bytes_sent" in columns:
        columns["mb_sent"] = [v / 1e6 for v in columns["bytes_sent"]]
    label = path.parent.name if path.name == "metrics.csv" and path.parent.name else path.stem
    return Series(label=label, steps=[_number(r["step"]) for r in rows], columns=columns,
                  source=str(path))


def load_series(path: str | os.PathLike) -> list[Series]:
    """The lines one file contributes: one per method of a demo JSON, one for a metrics CSV.

    Args:
        path: a ``qoda-hvd demo --json`` file (``.json``) or an example's ``metrics.csv``.

    Raises:
        ValueError: the file is neither (the message says what was expected).
        FileNotFoundError: it does not exist.

    Example::

        >>> load_series("runs/lm/metrics.csv")[0].label  # doctest: +SKIP
        'lm'
    """
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected the JSON object `qoda-hvd demo --json` writes")
        return _from_demo(data, path)
    return [_from_csv(path)]


def _metric(series: Sequence[Series], wanted: Optional[str]) -> str:
    have = set.intersection(*(set(s.columns) for s in series))
    if wanted is not None:
        if wanted not in have:
            raise ValueError(f"--metric {wanted!r} is not a column of every file; common "
                             f"columns: {', '.join(sorted(have)) or 'none'}")
        return wanted
    for name in DEFAULT_METRICS:
        if name in have:
            return name
    raise ValueError(f"none of {', '.join(DEFAULT_METRICS)} is a column of every file; name one "
                     f"with --metric (common columns: {', '.join(sorted(have)) or 'none'})")


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (the values themselves when ``window < 2``)."""
    if window < 2:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(_MISSING_MATPLOTLIB) from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_files(paths: Sequence[str | os.PathLike], out: Optional[str | os.PathLike] = None,
               metric: Optional[str] = None, title: Optional[str] = None) -> Path:
    """Draw the metric and the megabytes sent against the step, one line per method or run.

    Args:
        paths: demo JSON files and/or example CSVs (at least one).
        out: the PNG to write (default: the first file with the suffix ``.png``).
        metric: the left panel's column (default: the first of :data:`DEFAULT_METRICS` that
            every file has).
        title: the figure's title (default: the files' names).

    Returns:
        The PNG's path.

    Raises:
        RuntimeError: matplotlib is not installed (the message names the extra).
        ValueError: a file is not one of the two kinds, or the metric is not in every file.

    Example::

        >>> plot_files(["demo.json"])  # doctest: +SKIP
        PosixPath('demo.png')
    """
    if not paths:
        raise ValueError("paths must name at least one file")
    series = [s for p in paths for s in load_series(p)]
    name = _metric(series, metric)
    plt = _pyplot()
    out = Path(out) if out is not None else Path(paths[0]).with_suffix(".png")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, s in enumerate(series):
        # Methods that train alike draw on top of each other: a dash pattern per line keeps
        # every one visible.
        style = ("-", "--", ":", "-.")[i % 4]
        values = s.columns[name]
        smooth = _moving_average(values, len(values) // 30)
        if smooth is values:
            left.plot(s.steps, values, style, label=s.label, linewidth=1.4)
        else:  # per-step losses are noisy: faint as measured, a running mean on top
            line, = left.plot(s.steps, values, linewidth=0.6, alpha=0.3)
            left.plot(s.steps, smooth, style, label=f"{s.label} (mean of {len(values) // 30})",
                      color=line.get_color(), linewidth=1.6)
        if "mb_sent" in s.columns:
            right.plot(s.steps, s.columns["mb_sent"], style, label=s.label, linewidth=1.6)
    left.set(xlabel="step", ylabel=name, title=f"{name} (rank 0)" if name == "loss" else name)
    right.set(xlabel="step", ylabel="MB (cumulative)", title="payload bytes rank 0 sent")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or ", ".join(Path(p).name if Path(p).name != "metrics.csv"
                                    else str(Path(p)) for p in paths), fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """``qoda-hvd plot``'s options, added to ``parser`` (a new one by default).

    Example::

        >>> build_parser().parse_args(["demo.json", "-o", "d.png"]).out
        'd.png'
    """
    if parser is None:
        parser = argparse.ArgumentParser(prog="qoda-hvd plot", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="`qoda-hvd demo --json` files (one line per method) and/or the "
                             "examples' metrics.csv files (one line per file)")
    parser.add_argument("-o", "--out", default=None, metavar="PNG",
                        help="image to write (default: the first FILE with .png)")
    parser.add_argument("--metric", default=None,
                        help=f"left panel's column (default: the first of "
                             f"{', '.join(DEFAULT_METRICS)} present)")
    parser.add_argument("--title", default=None, help="figure title (default: the file names)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``qoda-hvd plot`` with parsed ``args``; prints the PNG's path."""
    try:
        out = plot_files(args.files, args.out, args.metric, args.title)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"qoda-hvd plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
