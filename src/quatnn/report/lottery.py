"""Reports of lottery folders (:mod:`quatnn.prune.lottery`): accuracy against the percent
of the real model's parameters that remain, and a table per level.

Reads ``lottery.toml`` and, in every ``<variant>-s<seed>/level-<LL>[-<control>]`` folder,
``config.toml``, ``summary.json`` and ``sparsity.json``; unfinished levels are left out.
The x axis is the paper's (Iqbal & Mishra 2023): remaining parameters (pruned weights
removed, biases kept) over those of the real model (``real4`` for colour data, ``real``
for grayscale), so a quaternion curve starts near 25%. Where the levels hold out a
validation set (``--val-split``), each level's accuracy is the test accuracy at its
early-stopping epoch, that of its highest validation accuracy (with ``--best-by loss``:
its lowest validation loss, as Frankle & Carbin (2019) stop), as they report tickets,
and the table gives that epoch too (they found that winning tickets reach it sooner).
Otherwise it is the accuracy of the last epoch. The weights left in each layer (tickets,
mean over seeds) come as a table at the deepest level and a plot over all levels.

Example:
    >>> from quatnn.report import lottery
    >>> lottery.is_lottery("runs/compare")
    False
    >>> result = lottery.write_lottery_report("runs/lottery")  # doctest: +SKIP
    >>> print(result.table)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

from quatnn.models import VARIANTS
from quatnn.report.runs import ReportError, read_run
from quatnn.report.table import (
    IGNORED_KEYS,
    Report,
    differing_keys,
    markdown_table,
    percent,
    shown_settings,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "is_lottery",
    "read_levels",
    "summarize_levels",
    "write_lotteries_report",
    "write_lottery_report",
]

RECIPE = "lottery.toml"
FILES = ("lottery.md", "lottery.json", "lottery.png", "lottery_layers.png")
METRICS = ("final", "best")
_LEVEL = re.compile(r"level-(\d+)(?:-(\w+))?")
_STYLES = {None: "-", "reinit": "--", "random": "-."}


def is_lottery(path: str | Path) -> bool:
    """Whether ``path`` is a lottery folder (it holds ``lottery.toml``)."""
    return (Path(path) / RECIPE).is_file()


def read_levels(path: str | Path) -> list[dict]:
    """One row per finished level folder: ``variant``, ``seed``, ``level``, ``control``
    (None for the ticket), ``final_acc``, ``best_acc`` and ``best_epoch`` (of the best
    epoch, :func:`quatnn.metrics.best_row`), ``validated`` (whether it held out a
    validation set), ``real_percent`` (parameters left, % of the real model's),
    ``params_percent`` and ``weights_percent`` (% of the model's own parameters and
    prunable weights), ``layers`` (each prunable layer's name -> % of its weights left),
    ``reference`` and ``path``."""
    rows = []
    for folder in sorted(Path(path).glob("*-s*/level-*")):
        match = _LEVEL.fullmatch(folder.name)
        if match is None or not (folder / "sparsity.json").is_file():
            continue
        run = read_run(folder)
        if run.summary is None:
            continue
        try:
            counts = json.loads((folder / "sparsity.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ReportError(f"cannot read {folder / 'sparsity.json'}: {err}") from None
        rows.append(
            {
                "variant": run.variant,
                "seed": run.seed,
                "level": int(match[1]),
                "control": match[2],
                "final_acc": run.summary["final_test_acc"],
                "best_acc": run.summary["best_test_acc"],
                "best_epoch": run.summary["best_epoch"],
                "validated": "best_val_acc" in run.summary,
                "real_percent": counts["real_params"]["percent_remaining"],
                "params_percent": counts["params"]["percent_remaining"],
                "weights_percent": counts["prunable"]["percent_remaining"],
                "layers": {c["name"]: c["percent_remaining"] for c in counts["layers"]},
                "reference": counts["reference"],
                "path": str(folder),
            }
        )
    return rows


def _order(variant: str) -> int:
    return VARIANTS.index(variant) if variant in VARIANTS else len(VARIANTS)


def summarize_levels(rows: Sequence[dict], metric: str = "final") -> list[dict]:
    """Rows of :func:`read_levels` grouped by variant, control and level: ``runs``,
    ``acc`` and ``acc_std`` (mean and sample std over seeds of the ``final`` or ``best``
    test accuracy) and the mean of ``best_epoch`` and of each percentage."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["control"] or "", row["level"]), []).append(row)
    result = []
    for (variant, control, level), members in sorted(
        groups.items(), key=lambda kv: (_order(kv[0][0]), *kv[0])
    ):
        accs = [m[f"{metric}_acc"] for m in members]
        result.append(
            {
                "variant": variant,
                "control": control or None,
                "level": level,
                "runs": len(members),
                "acc": statistics.fmean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                **{
                    key: statistics.fmean(m[key] for m in members)
                    for key in ("best_epoch", "real_percent", "params_percent", "weights_percent")
                },
            }
        )
    return result


def _cell(row: dict | None) -> str:
    if row is None:
        return "-"
    return f"{percent(row['acc'], row['acc_std'], row['runs'])} (n={row['runs']})"


def level_table(summary: Sequence[dict], epochs: bool = False) -> str:
    """The markdown table: one row per variant and level, the ticket's accuracy (and,
    with ``epochs``, its mean best epoch) and each control's accuracy beside it; rows of
    several lotteries (labelled by their ``lottery``) get a first column naming theirs."""
    present = {r["control"] for r in summary}
    controls = [c for c in _STYLES if c and c in present]
    cells = {(r.get("lottery", ""), r["variant"], r["control"], r["level"]): r for r in summary}
    several = any(r.get("lottery") for r in summary)
    shown = []
    for r in (r for r in summary if r["control"] is None):
        lottery = r.get("lottery", "")
        shown.append(
            {
                **({"lottery": lottery} if several else {}),
                "variant": r["variant"],
                "level": r["level"],
                "real params left (%)": f"{r['real_percent']:.2f}",
                "weights left (%)": f"{r['weights_percent']:.2f}",
                "ticket acc (%)": _cell(r),
                **({"ticket best epoch": f"{r['best_epoch']:.1f}"} if epochs else {}),
                **{
                    f"{c} acc (%)": _cell(cells.get((lottery, r["variant"], c, r["level"])))
                    for c in controls
                },
            }
        )
    return markdown_table(shown)


def layer_levels(rows: Sequence[dict]) -> dict[str, dict[int, dict[str, float]]]:
    """The tickets' weights left per layer: variant (with its ``lottery`` label, where
    rows have one) -> level -> layer name -> percent (the mean over seeds), for rows of
    :func:`read_levels`."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["control"] is None:
            key = (row.get("lottery", ""), row["variant"], row["level"])
            groups.setdefault(key, []).append(row["layers"])
    result: dict[str, dict[int, dict[str, float]]] = {}
    order = list(dict.fromkeys(row.get("lottery", "") for row in rows))
    for (lottery, variant, level), members in sorted(
        groups.items(), key=lambda kv: (order.index(kv[0][0]), _order(kv[0][1]), kv[0][1:])
    ):
        names = list(dict.fromkeys(name for layers in members for name in layers))
        series = f"{variant} ({lottery})" if lottery else variant
        result.setdefault(series, {})[level] = {
            name: statistics.fmean(layers[name] for layers in members if name in layers)
            for name in names
        }
    return result


def layer_table(layers: dict[str, dict[int, dict[str, float]]]) -> tuple[int, str]:
    """The deepest level that every variant's tickets reached, and the markdown table of
    the weights left in each layer there (a column per variant)."""
    level = min(max(levels) for levels in layers.values())
    names = list(dict.fromkeys(n for levels in layers.values() for n in levels[level]))
    shown = [
        {
            "layer": name,
            **{
                f"{variant} (%)": f"{levels[level][name]:.2f}" if name in levels[level] else "-"
                for variant, levels in layers.items()
            },
        }
        for name in names
    ]
    return level, markdown_table(shown)


def plot_layers(
    layers: dict[str, dict[int, dict[str, float]]], path: str | Path, title: str
) -> None:
    """Weights left per layer against the level, a panel per variant (log axis)."""
    fig = Figure(figsize=(4.2 * len(layers), 4.2), layout="constrained")
    axes = fig.subplots(1, len(layers), sharey=True, squeeze=False)[0]
    for ax, (variant, levels) in zip(axes, layers.items(), strict=True):
        names = list(dict.fromkeys(n for level in levels.values() for n in level))
        for i, name in enumerate(names):
            points = sorted((lv, v[name]) for lv, v in levels.items() if name in v)
            x, y = zip(*points, strict=True)
            ax.plot(x, y, marker="o", markersize=2, color=f"C{i % 10}", label=name)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="level", title=variant)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="xx-small", ncol=1 + len(names) // 12)
    axes[0].set_ylabel("weights left in the layer (%)")
    fig.suptitle(title, fontsize="medium")
    fig.savefig(path, dpi=120)


def plot_lottery(summary: Sequence[dict], path: str | Path, title: str) -> None:
    """Accuracy against the percent of real parameters left (log axis, decreasing to
    the right): a mean +- std band per variant (of each ``lottery``, where rows have
    one), controls dashed in the same colour."""
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    curves = list(dict.fromkeys((r.get("lottery", ""), r["variant"]) for r in summary))
    for i, (lottery, variant) in enumerate(curves):
        for control, style in _STYLES.items():
            points = [
                r
                for r in summary
                if (r.get("lottery", ""), r["variant"], r["control"]) == (lottery, variant, control)
            ]
            if not points:
                continue
            points.sort(key=lambda r: r["level"])
            x = [r["real_percent"] for r in points]
            mean = np.array([100 * r["acc"] for r in points])
            std = np.array([100 * r["acc_std"] for r in points])
            n = max(r["runs"] for r in points)
            label = f"{variant}{f' ({lottery})' if lottery else ''} {control or 'ticket'} (n={n})"
            ax.plot(
                x,
                mean,
                style,
                color=f"C{i % 10}",
                marker="o" if control is None else None,
                markersize=3,
                label=label,
            )
            ax.fill_between(
                x, mean - std, mean + std, color=f"C{i % 10}", alpha=0.2 if control is None else 0.1
            )
    xs = [r["real_percent"] for r in summary]
    ax.set_xscale("log")
    ax.set_xlim(max(xs) * 1.15, min(xs) / 1.15)
    ticks = [
        t
        for t in (100, 50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1)
        if min(xs) / 1.15 <= t <= max(xs) * 1.15
    ]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set(xlabel="parameters left (% of the real model's)", ylabel="test accuracy (%)")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def _title(recipe: dict) -> str:
    table = recipe.get("lottery", {})
    rates = table.get("rates") or {}
    rate = ", ".join(f"{k} {v}" for k, v in rates.items()) if rates else table.get("rate", "?")
    skip = table.get("skip") or []
    return (
        f"{recipe.get('model', '?')} on {recipe.get('dataset', '?')}: {table.get('scope', '?')} "
        f"{table.get('method', '?')} pruning, {rate} per level, "
        f"{table.get('granularity', '?')}, rewind {table.get('rewind', '?')}"
        + (f", {', '.join(skip)} kept" if skip else "")
    )


@dataclass
class _Lottery:
    """A lottery folder as read: its recipe, its finished levels (rows of
    :func:`read_levels`) and, in a report of several, what tells it apart."""

    path: Path
    recipe: dict
    rows: list[dict]
    label: str = ""


def _read_lottery(path: str | Path) -> _Lottery:
    path = Path(path)
    if not is_lottery(path):
        raise ReportError(f"{path} is not a lottery folder (no {RECIPE})")
    try:
        recipe = tomllib.loads((path / RECIPE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ReportError(f"cannot read {path / RECIPE}: {err}") from None
    rows = read_levels(path)
    if not rows:
        raise ReportError(f"no level in {path} has finished yet")
    return _Lottery(path, recipe, rows)


def write_lottery_report(
    path: str | Path, out: str | Path | None = None, metric: str | None = None
) -> Report:
    """Read the lottery folder ``path`` and write :data:`FILES` into ``out`` (default:
    ``path``); ``metric`` is the test accuracy of each level's ``final`` or ``best`` epoch
    (by default ``best`` where every level holds out a validation set, which chooses it,
    else ``final``)."""
    return _write([_read_lottery(path)], Path(out or path), metric)


def write_lotteries_report(
    paths: Sequence[str | Path], out: str | Path, metric: str | None = None
) -> Report:
    """One report of several lottery folders (e.g. element against whole-quaternion
    pruning) in ``out``: their curves share ``lottery.png`` and their rows one table, each
    labelled by the settings in which the lotteries' recipes differ (by its folder name
    where they differ in none). ``metric`` as in :func:`write_lottery_report`."""
    lotteries = [_read_lottery(path) for path in paths]
    settings = [
        {k: v for k, v in {**lot.recipe, **lot.recipe.get("lottery", {})}.items()
         if k not in ("lottery", "variants", "seeds", *IGNORED_KEYS)}
        for lot in lotteries
    ]  # fmt: skip
    keys = differing_keys(settings)
    for lot, values in zip(lotteries, settings, strict=True):
        lot.label = shown_settings(values, keys) or lot.path.name
    return _write(lotteries, Path(out), metric)


def _write(lotteries: Sequence[_Lottery], out: Path, metric: str | None) -> Report:
    rows = [{**row, "lottery": lot.label} for lot in lotteries for row in lot.rows]
    validated = all(r["validated"] for r in rows)
    metric = metric or ("best" if validated else "final")
    summary = [
        {"lottery": lot.label, **row}
        for lot in lotteries
        for row in summarize_levels(lot.rows, metric)
    ]
    out.mkdir(parents=True, exist_ok=True)
    recipe = lotteries[0].recipe
    title = (
        _title(recipe)
        if len(lotteries) == 1
        else (f"{recipe.get('model', '?')} on {recipe.get('dataset', '?')}: lotteries compared")
    )
    plot_lottery(summary, out / "lottery.png", title)
    layers = layer_levels(rows)
    plot_layers(layers, out / "lottery_layers.png", title)
    deepest, layers_table = layer_table(layers)
    table = level_table(summary, epochs=metric == "best")
    references = sorted({r["reference"] for r in rows})
    epoch = "last epoch"
    if metric == "best":
        by_loss = {lot.recipe.get("best_by") == "loss" for lot in lotteries} == {True}
        split = "validation" if validated else "test (no validation set)"
        chooser = f"lowest {split} loss" if by_loss else f"best {split} accuracy"
        epoch = f"early-stopping epoch (of its {chooser}; the best epoch column)"
    notes = [
        f"Accuracy: test accuracy at each level's {epoch}, mean ± sample std over seeds "
        "(n=1: the one value).",
        f"Real params left: parameters left (biases kept) over those of the {', '.join(references)}"
        " model; weights left: the model's own prunable weights.",
    ]
    if len(lotteries) > 1:
        notes += [f"{lot.label}: {_title(lot.recipe)} ({lot.path})" for lot in lotteries]
    lines = [f"# {title}", "", table, "", *[f"- {n}" for n in notes], ""]
    lines += ["![lottery](lottery.png)", ""]
    lines += [f"## Weights left per layer at level {deepest}", "", layers_table, ""]
    lines += ["Tickets, mean over seeds; every level: lottery_layers.png.", ""]
    lines += ["![layers](lottery_layers.png)", ""]
    (out / "lottery.md").write_text("\n".join(lines), encoding="utf-8")
    if len(lotteries) == 1:
        numbers: dict = {"recipe": recipe, "levels": lotteries[0].rows, "summary": summary}
    else:
        numbers = {
            "lotteries": [{"path": str(lot.path), "label": lot.label, "recipe": lot.recipe}
                          for lot in lotteries],
            "levels": rows,
            "summary": summary,
        }  # fmt: skip
    (out / "lottery.json").write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    return Report(table, summary, [out / name for name in FILES])
