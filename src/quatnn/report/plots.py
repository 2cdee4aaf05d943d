"""PNG plots of the rows of a report: curves per epoch with mean +- std bands, and
throughput.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display
and no global backend change).

Example:
    >>> from quatnn.report.runs import Run
    >>> runs = [Run(None, {"variant": "real", "seed": s}, [{"epoch": 1, "test_acc": a}], None)
    ...         for s, a in ((0, 0.5), (1, 0.7))]
    >>> epochs, mean, std = curve(runs, "test_acc")
    >>> epochs.tolist(), mean.round(3).tolist(), std.round(3).tolist()
    ([1], [0.6], [0.141])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from quatnn.report.runs import Run
from quatnn.report.table import Group


def curve(runs: Sequence[Run], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean and sample std over ``runs`` of metric ``key`` (each epoch over the
    runs that reached it; std 0 where only one did)."""
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for row in run.metrics:
            by_epoch.setdefault(row["epoch"], []).append(row[key])
    epochs = np.array(sorted(by_epoch))
    values = [np.array(by_epoch[e]) for e in epochs]
    mean = np.array([v.mean() for v in values])
    std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in values])
    return epochs, mean, std


def plot_curves(
    groups: Sequence[Group],
    metric: str,
    path: str | Path,
    *,
    percent: bool = False,
    log: bool = False,
) -> Figure:
    """Test ``metric`` (solid, with a mean +- std band), train ``metric`` (dashed) and,
    for runs with a validation set, validation ``metric`` (dotted) per epoch, one colour
    per group of :func:`~quatnn.report.table.group_runs`; ``metric`` is ``acc`` or
    ``loss``. Saves the figure to ``path`` and returns it."""
    many = len(groups) > 4  # then the legend goes right of the axes, the figure grows
    longest = max(len(g.label) for g in groups) if groups else 0
    size = (7 + 0.07 * longest, max(4.5, 0.45 * len(groups) + 1)) if many else (7, 4.5)
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    scale = 100.0 if percent else 1.0
    for i, group in enumerate(groups):
        color = f"C{i % 10}"
        epochs, mean, std = curve(group.runs, f"test_{metric}")
        label = f"{group.label} test (n={len(group.runs)})"
        dot = "o" if len(epochs) == 1 else None  # a single epoch draws no line
        ax.plot(epochs, scale * mean, color=color, label=label, marker=dot)
        ax.fill_between(epochs, scale * (mean - std), scale * (mean + std), color=color, alpha=0.2)
        epochs, mean, _ = curve(group.runs, f"train_{metric}")
        ax.plot(
            epochs,
            scale * mean,
            color=color,
            linestyle="--",
            linewidth=1,
            alpha=0.8,
            marker=dot,
            label=f"{group.label} train",
        )
        if all(f"val_{metric}" in row for run in group.runs for row in run.metrics):
            epochs, mean, _ = curve(group.runs, f"val_{metric}")
            ax.plot(epochs, scale * mean, color=color, linestyle=":", marker=dot,
                    label=f"{group.label} validation")  # fmt: skip
    name = "accuracy (%)" if metric == "acc" else metric
    ax.set(xlabel="epoch", ylabel=name, title=f"{name} per epoch, mean ± std over seeds")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if many:
        fig.legend(loc="outside right upper", fontsize="small")
    else:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return fig


def plot_throughput(rows: Sequence[dict], path: str | Path) -> None:
    """Bar chart of training samples/s per row of :func:`~quatnn.report.table.summarize`
    (mean +- std over seeds)."""
    labels = [r["label"] for r in rows]
    width = 4.0 + 0.07 * max(map(len, labels))  # the labels sit left of the bars
    fig = Figure(figsize=(width, max(2.5, 1.2 + 0.35 * len(rows))), layout="constrained")
    ax = fig.subplots()
    means = [r["samples_per_second"] for r in rows]
    errors = [r["samples_per_second_std"] for r in rows]
    colors = [f"C{i % 10}" for i in range(len(rows))]
    ax.barh(labels, means, xerr=errors, capsize=4, color=colors)
    ax.invert_yaxis()  # the table's order, top down
    ax.set(xlabel="samples/s", title="training throughput")
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=120)
