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
) -> None:
    """Test ``metric`` (solid, with a mean +- std band) and train ``metric`` (dashed) per
    epoch, one colour per group of :func:`~quatnn.report.table.group_runs`; ``metric`` is
    ``acc`` or ``loss``."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    scale = 100.0 if percent else 1.0
    for i, group in enumerate(groups):
        color = f"C{i % 10}"
        epochs, mean, std = curve(group.runs, f"test_{metric}")
        label = f"{group.label} test (n={len(group.runs)})"
        ax.plot(epochs, scale * mean, color=color, label=label)
        ax.fill_between(epochs, scale * (mean - std), scale * (mean + std), color=color, alpha=0.2)
        epochs, mean, _ = curve(group.runs, f"train_{metric}")
        ax.plot(
            epochs,
            scale * mean,
            color=color,
            linestyle="--",
            linewidth=1,
            alpha=0.8,
            label=f"{group.label} train",
        )
    name = "accuracy (%)" if metric == "acc" else metric
    ax.set(xlabel="epoch", ylabel=name, title=f"{name} per epoch, mean ± std over seeds")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def plot_throughput(rows: Sequence[dict], path: str | Path) -> None:
    """Bar chart of training samples/s per row of :func:`~quatnn.report.table.summarize`
    (mean +- std over seeds)."""
    fig = Figure(figsize=(max(4.0, 1.2 * len(rows) + 2), 4), layout="constrained")
    ax = fig.subplots()
    labels = [r["label"] for r in rows]
    means = [r["samples_per_second"] for r in rows]
    errors = [r["samples_per_second_std"] for r in rows]
    ax.bar(labels, means, yerr=errors, capsize=4, color=[f"C{i % 10}" for i in range(len(rows))])
    ax.set(ylabel="samples/s", title="training throughput")
    ax.tick_params(axis="x", labelrotation=20 if max(map(len, labels)) > 12 else 0)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)
