"""The choice of a run's best epoch from the rows of its ``metrics.jsonl``: shared by
:mod:`quatnn.train`, which writes the rows and saves ``best.pt``, and
:mod:`quatnn.report`, which reads them (neither imports the other). Imports nothing of
quatnn.

Example:
    >>> rows = [{"epoch": 1, "val_acc": 0.9, "val_loss": 0.5, "test_acc": 0.7},
    ...         {"epoch": 2, "val_acc": 0.8, "val_loss": 0.4, "test_acc": 0.8}]
    >>> best_row(rows)["epoch"], best_row(rows, "loss")["epoch"]
    (1, 2)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

BEST_BY = ("acc", "loss")
"""What makes an epoch the best: the highest accuracy or the lowest loss."""


def best_row(rows: Sequence[Mapping], by: str = "acc") -> Mapping:
    """The row of the best epoch among metrics ``rows``: the highest accuracy (``by``
    ``"acc"``) or the lowest loss (``"loss"``) on the validation set where the run holds
    one out, else on the test set; the first of equals."""
    if by not in BEST_BY:
        raise ValueError(f"by must be one of {', '.join(BEST_BY)}, got {by!r}")
    key = f"{'val' if 'val_acc' in rows[0] else 'test'}_{by}"
    sign = 1 if by == "acc" else -1
    return max(rows, key=lambda row: sign * row[key])
