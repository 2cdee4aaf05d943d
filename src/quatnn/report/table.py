"""Per-row statistics over seeds, and markdown tables.

Runs share a row when they differ in nothing but the seed and :data:`IGNORED_KEYS`: the
same model, dataset, variant and other settings of ``config.toml`` (the encoding as
trained: ``auto`` is the encoding it stands for) and, for a lottery level, the same
level, control and pruning recipe. A row's label is its variant and the settings in
which the rows of its model and dataset differ, e.g. ``quaternion (epochs=10)``,
prefixed with model and dataset when the rows span several. For each row: the number of
runs, repeated seeds, parameters (of a lottery level: those left after pruning), the
ratio of parameters to the unpruned real reference of the same model, dataset and model
options (``real4``, else ``real``, else the first real variant), the test accuracy of
the last and of the best epoch (:func:`~quatnn.metrics.best_row`: chosen by
validation accuracy where runs hold out a validation set; mean and sample standard
deviation over the runs; the top-5 accuracies too where the runs measured them), and the
training time per epoch and samples/s (mean over the epochs after the first, which
includes warm-up).

Example:
    >>> print(markdown_table([{"variant": "real", "params": "266,610"},
    ...                       {"variant": "quaternion", "params": "67,710"}]))
    | variant | params |
    |---|---|
    | real | 266,610 |
    | quaternion | 67,710 |
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from quatnn import data, models
from quatnn.metrics import best_row
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

LOTTERY_KEYS = ("levels", "controls", "control_levels", "min_acc")  # of a [lottery] table
IGNORED_KEYS = (
    "data_dir",
    "device",
    "workers",
    "compile",
    "compile_mode",
    "channels_last",
    "backend",
    *LOTTERY_KEYS,
)
"""Keys that do not change what a run trains, so runs that differ only in these and in
``seed`` share a row: of ``config.toml``, where the data is read from and how the run
was executed (``sync_bn`` is not one: it changes batch norm statistics under torchrun);
of a lottery's ``[lottery]`` table, how many levels and controls it trains and when it
stops. Spelled out because the report reads files and never imports the training code;
a test holds them equal to the runtime fields and the lottery's bookkeeping keys."""


@dataclass
class Group:
    """The runs of one row: the same ``model``, ``dataset``, ``variant``, ``settings``
    and ``lottery`` (:func:`identity`); ``label`` names the row."""

    model: str
    dataset: str
    variant: str
    settings: dict
    lottery: dict | None
    runs: list[Run]
    label: str = ""


def trained_encoding(run: Run) -> object:
    """The encoding ``run`` trained on: its ``summary.json``'s, else its config's with
    ``auto`` resolved as training resolves it (:func:`quatnn.data.default_encoding`)."""
    if run.summary and "encoding" in run.summary:
        return run.summary["encoding"]
    encoding = run.config.get("encoding")
    if encoding != "auto":
        return encoding
    try:
        flat = models.spec(run.model).input_kind == "flat"
        return data.default_encoding(run.dataset, run.variant, flat=flat)
    except ValueError:  # a model or dataset this version does not know
        return encoding


def identity(run: Run) -> tuple[dict, dict | None]:
    """What defines ``run`` besides model, dataset, variant and seed, without
    :data:`IGNORED_KEYS`: its config (with :func:`trained_encoding`) and, for a lottery
    level, :attr:`Run.lottery`."""
    skip = {*IGNORED_KEYS, "model", "dataset", "variant", "seed"}
    config = {k: v for k, v in run.config.items() if k not in skip}
    if "encoding" in config:
        config["encoding"] = trained_encoding(run)
    if run.lottery is None:
        return config, None
    return config, {k: v for k, v in run.lottery.items() if k not in skip}


def _variant_order(variant: str) -> int:
    return VARIANTS.index(variant) if variant in VARIANTS else len(VARIANTS)


def _canon(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _shown(value: object) -> str:
    """A setting's value in a label, TOML-like."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_shown(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(_shown, value)) + "]"
    return str(value)


def shown_settings(values: Mapping, keys: Sequence[str]) -> str:
    """``k=v, ...`` for those of ``keys`` that ``values`` has, TOML-like (a row's label)."""
    return ", ".join(f"{k}={_shown(values[k])}" for k in keys if k in values)


def differing_keys(
    items: Sequence,
    values: Callable[[object], Mapping] = lambda item: item,
    compared: Callable[[str, object, object], bool] | None = None,
) -> list[str]:
    """The keys whose values differ between two of ``items`` (``values(item)``: its
    settings), in order of appearance; ``compared(key, a, b)`` may leave a key out of a
    pair's comparison.

    >>> differing_keys([{"lr": 1, "epochs": 2}, {"lr": 1, "epochs": 3}])
    ['epochs']
    """
    settings = [values(item) for item in items]
    keys = dict.fromkeys(k for v in settings for k in v)
    pairs = list(itertools.combinations(zip(items, settings, strict=True), 2))
    return [
        k
        for k in keys
        if any(
            (compared is None or compared(k, a, b)) and _canon(va.get(k)) != _canon(vb.get(k))
            for (a, va), (b, vb) in pairs
        )
    ]


def _values(group: Group) -> dict:
    return {**group.settings, **(group.lottery or {})}


def _compared(key: str, a: Group, b: Group) -> bool:
    """Whether rows ``a`` and ``b`` are told apart by ``key``: ``encoding`` only within a
    variant (older runs wrote each variant's own default), a key of a lottery's recipe
    only between lottery levels (``level`` tells those from other runs)."""
    if key == "encoding":
        return a.variant == b.variant
    if key in ("level", "control") or key in a.settings or key in b.settings:
        return True
    return a.lottery is not None and b.lottery is not None


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs with at least one epoch grouped into labelled rows (see the module
    docstring), by model and dataset, then in variant order, then in order of appearance.
    A label leaves out the keys a row's runs do not have."""
    groups: dict[tuple[str, ...], Group] = {}
    for run in runs:
        if run.metrics:
            config, lottery = identity(run)
            key = (run.model, run.dataset, run.variant, _canon(config), _canon(lottery))
            new = Group(run.model, run.dataset, run.variant, config, lottery, [])
            groups.setdefault(key, new).runs.append(run)
    ordered = sorted(groups.values(), key=lambda g: (g.model, g.dataset, _variant_order(g.variant)))
    several = len({(g.model, g.dataset) for g in ordered}) > 1
    for (model, dataset), same in itertools.groupby(ordered, lambda g: (g.model, g.dataset)):
        same = list(same)
        keys = differing_keys(same, _values, _compared)
        for g in same:
            shown = shown_settings(_values(g), keys)
            g.label = f"{model} {dataset} {g.variant}" if several else g.variant
            g.label += f" ({shown})" if shown else ""
    return ordered


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _optional(name: str, rows: Sequence[Mapping], key: str) -> dict:
    """``name`` and ``name_std``: the mean and std of ``key`` over ``rows``, or None where
    a row lacks it (a score that not every run measured)."""
    if not all(key in row for row in rows):
        return {name: None, f"{name}_std": None}
    mean, std = _mean_std([row[key] for row in rows])
    return {name: mean, f"{name}_std": std}


def _steady(run: Run, key: str) -> float:
    """Mean of ``key`` over the epochs after the first (all epochs if there is one)."""
    rows = run.metrics[1:] or run.metrics
    return statistics.fmean(row[key] for row in rows)


def _params(group: Group, left: bool = False) -> int | None:
    """The parameters of ``group``'s model (``summary.json``); with ``left``, those left
    after pruning where the runs are lottery levels."""
    for r in group.runs:
        if left and r.params_left is not None:
            return r.params_left
        if r.summary and "params" in r.summary:
            return r.summary["params"]
    return None


def _reference(group: Group, groups: Sequence[Group]) -> Group | None:
    """The real group of ``group``'s model, dataset and model options that its parameter
    ratio refers to: :data:`REFERENCES` in order, else the first real one."""
    options = _canon(group.settings.get("options"))
    reals = [
        g
        for g in groups
        if (g.model, g.dataset) == (group.model, group.dataset)
        and g.variant.startswith("real")
        and _canon(g.settings.get("options")) == options
    ]
    preferred = (g for variant in REFERENCES for g in reals if g.variant == variant)
    return next(preferred, reals[0] if reals else None)


def summarize(runs: Sequence[Run]) -> list[dict]:
    """One row of numbers per group of :func:`group_runs` (see the module docstring);
    accuracies are fractions, a single run's std is 0, ``repeated_seeds`` are the seeds
    held by more than one run of the row."""
    groups = group_runs(runs)
    rows = []
    for g in groups:
        reference = _reference(g, groups)
        mine = _params(g, left=True)  # against the unpruned reference
        theirs = _params(reference) if reference else None
        members = g.runs
        final = _mean_std([r.metrics[-1]["test_acc"] for r in members])
        bests = [best_row(r.metrics, r.config.get("best_by", "acc")) for r in members]
        best = _mean_std([row["test_acc"] for row in bests])
        speed = _mean_std([_steady(r, "samples_per_second") for r in members])
        seeds = Counter(r.seed for r in members)
        rows.append(
            {
                "label": g.label,
                "model": g.model,
                "dataset": g.dataset,
                "variant": g.variant,
                "settings": g.settings,
                "lottery": g.lottery,
                "runs": len(members),
                "repeated_seeds": [seed for seed, n in seeds.items() if n > 1],
                "unfinished": sum(not r.finished for r in members),
                "epochs": max(len(r.metrics) for r in members),
                "params": mine,
                "reference": reference.variant if reference else None,
                "ratio": mine / theirs if mine and theirs else None,
                "final_acc": final[0],
                "final_acc_std": final[1],
                "best_acc": best[0],
                "best_acc_std": best[1],
                **_optional("best_val_acc", bests, "val_acc"),  # None: no validation set
                **_optional("final_top5", [r.metrics[-1] for r in members], "test_top5"),
                **_optional("best_top5", bests, "test_top5"),
                "seconds_per_epoch": statistics.fmean(_steady(r, "epoch_seconds") for r in members),
                "samples_per_second": speed[0],
                "samples_per_second_std": speed[1],
            }
        )
    return rows


def percent(mean: float, std: float, runs: int) -> str:
    """``mean ± std`` in percent; the value alone for a single run."""
    return f"{100 * mean:.2f}" if runs == 1 else f"{100 * mean:.2f} ± {100 * std:.2f}"


def display_rows(rows: Sequence[dict]) -> list[dict]:
    """``rows`` of :func:`summarize` as the strings of the report table; the first column
    is the row's label. Where some rows hold out a validation set, a column gives its
    accuracy at the best epoch; where some measured the top-5 accuracy (datasets of many
    classes), two columns give it at the last and the best epoch."""
    validated = any(r["best_val_acc"] is not None for r in rows)
    top5 = any(r["final_top5"] is not None for r in rows)
    shown = []
    for r in rows:
        unfinished = f" ({r['unfinished']} unfinished)" if r["unfinished"] else ""
        row = {
            "variant": r["label"],
            "runs": f"{r['runs']}{unfinished}",
            "epochs": str(r["epochs"]),
            "params": "?" if r["params"] is None else f"{r['params']:,}",
            "ratio to real": "-" if r["ratio"] is None else f"{r['ratio']:.3f}",
            "final test acc (%)": percent(r["final_acc"], r["final_acc_std"], r["runs"]),
            "best test acc (%)": percent(r["best_acc"], r["best_acc_std"], r["runs"]),
        }
        if validated:
            val = r["best_val_acc"], r["best_val_acc_std"], r["runs"]
            row["best val acc (%)"] = "-" if val[0] is None else percent(*val)
        for when in ("final", "best") if top5 else ():
            value = r[f"{when}_top5"], r[f"{when}_top5_std"], r["runs"]
            row[f"{when} test top-5 (%)"] = "-" if value[0] is None else percent(*value)
        row["s/epoch"] = f"{r['seconds_per_epoch']:.2f}"
        row["samples/s"] = f"{r['samples_per_second']:.0f}"
        shown.append(row)
    return shown


def markdown_table(rows: Sequence[dict]) -> str:
    """A markdown table with the keys of the first row as columns."""
    columns = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
