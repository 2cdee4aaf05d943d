"""Stratified splits of a dataset: the bundled digits' fixed train/test split, and the
validation set a run holds out of its training set (``quatnn train --val-split``).

Example:
    >>> first, rest = stratified_split([0, 0, 0, 0, 1, 1, 1, 1], 0.25, seed=0)
    >>> len(first), len(rest), sorted([*first, *rest]) == list(range(8))
    (2, 6, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset, Subset

VALIDATION_SEED = 0
"""Seed of the validation split: fixed, so that every variant and seed of a comparison
holds out the same images."""


def stratified_split(
    labels: Sequence[int] | np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices into ``labels`` in two disjoint parts: of the ``n_c`` items of each
    class ``c``, ``round(fraction * n_c)`` drawn at random (numpy's ``default_rng(seed)``,
    classes in ascending order), and the rest."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    first, rest = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = round(fraction * len(members))
        first.append(members[:k])
        rest.append(members[k:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(rest))


def validation_split(train: Dataset, plain: Dataset, fraction: float) -> tuple[Subset, Subset]:
    """``train`` (a training split as trained on, with its augmentation) less a stratified
    ``fraction`` of its items, and those items read from ``plain`` (the same split without
    augmentation) as a validation set. Both datasets need ``targets``. The split depends on
    the labels and ``fraction`` alone (:data:`VALIDATION_SEED`).

    >>> from quatnn import data
    >>> train = data.load("digits", train=True, encoding="identity")
    >>> plain = data.load("digits", train=True, encoding="identity", augment=False)
    >>> rest, val = validation_split(train, plain, 0.1)
    >>> len(train), len(rest), len(val)
    (1438, 1295, 143)
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    if len(train) != len(plain):
        raise ValueError(f"train ({len(train)} items) and plain ({len(plain)}) differ in size")
    val, rest = stratified_split(train.targets, fraction, VALIDATION_SEED)
    if not len(val) or not len(rest):
        empty = "validation" if not len(val) else "training"
        raise ValueError(
            f"a validation fraction of {fraction} of {len(train)} training images leaves the "
            f"{empty} set empty; choose a fraction that holds out some images but not all"
        )
    return Subset(train, rest.tolist()), Subset(plain, val.tolist())
