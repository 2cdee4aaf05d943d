"""Reports from run folders: plots, a markdown table and the numbers behind it.

Reads only what runs wrote to disk (never imports :mod:`quatnn.train`), so runs trained
on a GPU cluster can be reported on a laptop.

Example:
    >>> from quatnn import report
    >>> result = report.write_report(["runs/compare"])  # doctest: +SKIP
    >>> print(result.table)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from quatnn.report.plots import plot_curves, plot_throughput
from quatnn.report.runs import ReportError, Run, find_runs, read_run
from quatnn.report.table import (
    IGNORED_KEYS,
    LOTTERY_KEYS,
    Report,
    display_rows,
    group_runs,
    markdown_table,
    summarize,
)

__all__ = [
    "Report",
    "ReportError",
    "Run",
    "find_runs",
    "markdown_table",
    "read_run",
    "summarize",
    "write_report",
]

FILES = ("report.md", "report.json", "accuracy.png", "loss.png", "throughput.png")


def _notes(runs: Sequence[Run], rows: Sequence[dict]) -> list[str]:
    devices = sorted({r.summary["device"] for r in runs if r.summary and "device" in r.summary})
    references = sorted({r["reference"] for r in rows if r["reference"]})
    lottery = any(r["lottery"] for r in rows)
    ignored = IGNORED_KEYS if lottery else [k for k in IGNORED_KEYS if k not in LOTTERY_KEYS]
    notes = [
        "Rows: runs that differ only in seed (and in "
        f"{', '.join(ignored)}) share a row; a label names the settings in which the "
        "rows of its model and dataset differ.",
        "Accuracies: test accuracy of the last epoch (final) and of the best epoch, mean ± "
        "sample std over the runs of a row (a single run: its value). A run's best epoch "
        "has its highest accuracy (--best-by loss: its lowest loss) on the validation set "
        "where it holds one out (--val-split), else on the test set.",
        "Time per epoch and samples/s: training only (evaluation excluded), mean over the "
        "epochs after the first (warm-up; a run of one epoch: that epoch, warm-up included)"
        + (f"; measured on {', '.join(devices)}." if devices else "."),
    ]
    if any(r["final_top5"] is not None for r in rows):
        notes.append(
            "Top-5: the share of test images whose label is among the model's five highest "
            "scores (measured on datasets of more than 10 classes)."
        )
    if references:
        left = " (lottery levels: the parameters left after pruning)" if lottery else ""
        notes.append(f"Ratio to real: parameters{left} over those of {' / '.join(references)}.")
    for r in rows:
        if r["repeated_seeds"]:
            seeds = ", ".join(map(str, r["repeated_seeds"]))
            notes.append(
                f"{r['label']}: seed {seeds} in several run folders with the same settings "
                "(copies or reruns); each counts as a run, so its spread is not over distinct "
                "seeds."
            )
    unfinished = [r["label"] for r in rows if r["unfinished"]]
    if unfinished:
        notes.append(
            f"Unfinished runs ({', '.join(unfinished)}) count with their latest epoch: the "
            "final accuracy of such a row mixes runs at different epochs."
        )
    empty = [str(r.path) for r in runs if not r.metrics]
    if empty:
        notes.append(f"Runs without a finished epoch (left out): {', '.join(empty)}.")
    return notes


def write_report(paths: Sequence[str | Path], out: str | Path | None = None) -> Report:
    """Read the runs in ``paths`` (run folders or folders with run folders at any depth)
    and write :data:`FILES` into ``out`` (default: the one path given; required for
    several)."""
    if out is None:
        if len(paths) != 1:
            raise ReportError("several folders given: say where the report goes with --out")
        out = paths[0]
    out = Path(out)
    runs = find_runs(paths)
    rows = summarize(runs)
    if not rows:
        raise ReportError(f"no run in {', '.join(map(str, paths))} has finished an epoch yet")
    table = markdown_table(display_rows(rows))
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    plot_curves(groups, "acc", out / "accuracy.png", percent=True)
    plot_curves(groups, "loss", out / "loss.png", log=True)
    plot_throughput(rows, out / "throughput.png")
    pairs = sorted({(r["model"], r["dataset"]) for r in rows})
    title = "; ".join(f"{model} on {dataset}" for model, dataset in pairs)
    lines = [f"# {title}", "", table, ""]
    lines += [f"- {note}" for note in _notes(runs, rows)]
    lines += ["", "![accuracy](accuracy.png)", "", "![loss](loss.png)", ""]
    lines += ["![throughput](throughput.png)", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    numbers = {"runs": [str(r.path) for r in runs], "rows": rows}
    (out / "report.json").write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    return Report(table, rows, [out / name for name in FILES])
