"""Accuracy against speed: one point per configuration (mean over seeds, error bars one sample
std), the Pareto front drawn, one panel per task. Written as a PNG with matplotlib's Agg
backend (no display needed)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

from sparseformer.sweep.table import MAIN_METRICS, LOWER, Record, Stat, aggregate, relative_values


@dataclasses.dataclass(frozen=True)
class Point:
    label: str
    x: Stat   # speed (relative to the reference when it is there, else steps/s)
    y: Stat   # task metric


def pareto_front(points: Sequence[tuple[float, float]], maximize: tuple[bool, bool] = (True, True)) -> list[int]:
    """Indices of the points no other point dominates (at least as good on both axes and
    better on one), sorted by x."""
    sx, sy = (1 if m else -1 for m in maximize)
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(sx * a >= sx * x and sy * b >= sy * y and (sx * a > sx * x or sy * b > sy * y)
                        for j, (a, b) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _at_largest_length(records: Sequence[Record]) -> list[Record]:
    """Per task, only the runs at its largest `max_len` (a sweep over lengths gives one point
    per configuration, at the length where speed matters most)."""
    largest: dict[str, int] = {}
    for r in records:
        largest[r.task] = max(largest.get(r.task, -1), r.max_len or -1)
    return [r for r in records if (r.max_len or -1) == largest[r.task]]


def tradeoff_points(records: Sequence[Record], task: str, reference: str = "dense") -> tuple[list[Point], str, str]:
    """The points of one task, and the axis titles."""
    mine = [r for r in _at_largest_length(records) if r.task == task]
    metric = next((r.main_metric for r in mine if r.main_metric), None)
    if metric is None:
        return [], "", ""
    rel = relative_values(mine, "steps_per_second", reference)
    use_rel = bool(rel)
    scale = 100.0 if metric == "accuracy" and all((r.value(metric) or 0) <= 1 for r in mine) else 1.0
    labels = list(dict.fromkeys(r.label for r in sorted(mine, key=lambda r: r.order)))
    points = []
    for label in labels:
        xs = [rel[i] if use_rel else r.value("steps_per_second") for i, r in enumerate(mine) if r.label == label]
        ys = [r.value(metric) * scale for r in mine if r.label == label and r.value(metric) is not None]
        xs = [x for x in xs if x is not None]
        if xs and ys:
            points.append(Point(label, aggregate(xs), aggregate(ys)))
    xtitle = f"training steps/s (× {reference})" if use_rel else "training steps/s"
    ytitle = f"{metric} (%)" if scale == 100.0 else metric
    if MAIN_METRICS.get(metric) == LOWER:
        ytitle += " (lower is better)"
    return points, xtitle, ytitle


def plot_tradeoff(records: Sequence[Record], path: str | Path, *, reference: str = "dense",
                  title: str = "Task metric against training speed") -> Path:
    """Write the accuracy-speed plot of `records` to `path` (PNG); one panel per task."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    tasks = sorted({r.task for r in records})
    if not tasks:
        raise ValueError("no finished runs to plot")
    # Labels are long ("selection + compression + correction, no regulariser") and points close: each
    # configuration gets a colour and a number, shown beside its point, and one legend below the panels
    # names them, so nothing is written over anything else.
    panels = {task: tradeoff_points(records, task, reference) for task in tasks}
    labels = list(dict.fromkeys(p.label for points, _, _ in panels.values() for p in points))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    color = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}
    number = {label: i + 1 for i, label in enumerate(labels)}
    rows = max(1, math.ceil(len(labels) / 3))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2 + 0.28 * rows), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        points, xtitle, ytitle = panels[task]
        ax.set_title(task)
        if not points:
            ax.text(0.5, 0.5, "no task metric", ha="center", transform=ax.transAxes)
            continue
        err = lambda s: 0.0 if math.isnan(s.std) else s.std  # noqa: E731
        for p in points:
            ax.errorbar(p.x.mean, p.y.mean, xerr=err(p.x), yerr=err(p.y), fmt="o", capsize=3, color=color[p.label])
            ax.annotate(str(number[p.label]), (p.x.mean, p.y.mean), textcoords="offset points", xytext=(4, 3),
                        fontsize=8, color=color[p.label], fontweight="bold")
        metric = ytitle.split(" ")[0]
        front = pareto_front([(p.x.mean, p.y.mean) for p in points],
                             maximize=(True, MAIN_METRICS.get(metric) != LOWER))
        ax.plot([points[i].x.mean for i in front], [points[i].y.mean for i in front], "--", color="gray")
        ax.set_xlabel(xtitle)
        ax.set_ylabel(ytitle)
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D  # noqa: PLC0415

    handles = [Line2D([], [], marker="o", ls="", color=color[lb], label=f"{number[lb]}  {lb}") for lb in labels]
    handles.append(Line2D([], [], ls="--", color="gray", label="Pareto front"))
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07 * rows / (1 + 0.07 * rows) + 0.02, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
