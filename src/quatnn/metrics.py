"""The choice of a run's best epoch from the rows of its ``metrics.jsonl``: shared by
:mod:`quatnn.train`, which writes the rows and saves ``best.pt``, and
:mod:`quatnn.report`, which reads them (neither imports the other). Imports nothing of
quatnn.

Example:
    >>> best_row([{"epoch": 1, "val_acc": 0.9, "test_acc": 0.7},
    ...           {"epoch": 2, "val_acc": 0.8, "test_acc": 0.8}])["epoch"]
    1
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def best_row(rows: Sequence[Mapping]) -> Mapping:
    """The row of the best epoch among metrics ``rows``: the highest ``val_acc`` where
    the run holds out a validation set, else the highest ``test_acc``; the first of
    equals."""
    key = "val_acc" if "val_acc" in rows[0] else "test_acc"
    return max(rows, key=lambda row: row[key])
