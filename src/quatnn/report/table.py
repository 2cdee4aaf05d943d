"""Per-variant statistics over seeds, and markdown tables.

Runs are grouped by model, dataset and variant. For each group: the number of runs,
parameters, the ratio of parameters to the real reference of the same model and
dataset (``real4``, else ``real``, else the first real variant), final and best test
accuracy (mean and sample standard deviation over the runs), and the training time per
epoch and samples/s (mean over the epochs after the first, which includes warm-up).

Example:
    >>> print(markdown_table([{"variant": "real", "params": "266,610"},
    ...                       {"variant": "quaternion", "params": "67,710"}]))
    | variant | params |
    |---|---|
    | real | 266,610 |
    | quaternion | 67,710 |
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from quatnn.models import VARIANTS
from quatnn.report.runs import Run


@dataclass
class Report:
    """What a report writer wrote: the markdown ``table``, its numeric ``rows`` and the
    ``files`` (the markdown file first)."""

    table: str
    rows: list[dict]
    files: list[Path]


REFERENCES = ("real4", "real")
"""Variants that serve as the real reference of a ratio, in order of preference."""


def _variant_order(variant: str) -> int:
    return VARIANTS.index(variant) if variant in VARIANTS else len(VARIANTS)


def group_runs(runs: Sequence[Run]) -> dict[tuple[str, str, str], list[Run]]:
    """Runs with at least one epoch, by (model, dataset, variant) in variant order."""
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        if run.metrics:
            groups.setdefault((run.model, run.dataset, run.variant), []).append(run)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][:2], _variant_order(kv[0][2]))))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _steady(run: Run, key: str) -> float:
    """Mean of ``key`` over the epochs after the first (all epochs if there is one)."""
    rows = run.metrics[1:] or run.metrics
    return statistics.fmean(row[key] for row in rows)


def summarize(runs: Sequence[Run]) -> list[dict]:
    """One row of numbers per group (see the module docstring); accuracies are fractions."""
    groups = group_runs(runs)
    params = {}
    for key, members in groups.items():
        counts = [r.summary["params"] for r in members if r.summary and "params" in r.summary]
        params[key] = counts[0] if counts else None
    rows = []
    for (model, dataset, variant), members in groups.items():
        candidates = [k for k in groups if k[:2] == (model, dataset)]
        reals = [k for k in candidates if k[2].startswith("real")]
        reference = next((k for v in REFERENCES for k in reals if k[2] == v), None)
        reference = reference or (reals[0] if reals else None)
        mine, theirs = params[(model, dataset, variant)], params.get(reference)
        final = _mean_std([r.metrics[-1]["test_acc"] for r in members])
        best = _mean_std([max(row["test_acc"] for row in r.metrics) for r in members])
        speed = _mean_std([_steady(r, "samples_per_second") for r in members])
        rows.append(
            {
                "model": model,
                "dataset": dataset,
                "variant": variant,
                "runs": len(members),
                "unfinished": sum(not r.finished for r in members),
                "epochs": max(len(r.metrics) for r in members),
                "params": mine,
                "reference": reference[2] if reference else None,
                "ratio": mine / theirs if mine and theirs else None,
                "final_acc": final[0],
                "final_acc_std": final[1],
                "best_acc": best[0],
                "best_acc_std": best[1],
                "seconds_per_epoch": statistics.fmean(_steady(r, "epoch_seconds") for r in members),
                "samples_per_second": speed[0],
                "samples_per_second_std": speed[1],
            }
        )
    return rows


def _percent(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def display_rows(rows: Sequence[dict]) -> list[dict]:
    """``rows`` of :func:`summarize` as the strings of the report table; the first column
    names the variant, or model, dataset and variant when the rows span several."""
    several = len({(r["model"], r["dataset"]) for r in rows}) > 1
    shown = []
    for r in rows:
        unfinished = f" ({r['unfinished']} unfinished)" if r["unfinished"] else ""
        shown.append(
            {
                "variant": f"{r['model']} {r['dataset']} {r['variant']}"
                if several
                else r["variant"],
                "runs": f"{r['runs']}{unfinished}",
                "epochs": str(r["epochs"]),
                "params": "?" if r["params"] is None else f"{r['params']:,}",
                "ratio to real": "-" if r["ratio"] is None else f"{r['ratio']:.3f}",
                "final test acc (%)": _percent(r["final_acc"], r["final_acc_std"]),
                "best test acc (%)": _percent(r["best_acc"], r["best_acc_std"]),
                "s/epoch": f"{r['seconds_per_epoch']:.2f}",
                "samples/s": f"{r['samples_per_second']:.0f}",
            }
        )
    return shown


def markdown_table(rows: Sequence[dict]) -> str:
    """A markdown table with the keys of the first row as columns."""
    columns = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
