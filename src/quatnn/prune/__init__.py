"""Pruning of real and quaternion networks, and lottery tickets.

- :mod:`~quatnn.prune.masks`: masks beside each prunable layer's ``weight`` that keep
  pruned weights at exactly zero through training; saving and loading them.
- :mod:`~quatnn.prune.strategies`: magnitude or random pruning, global or layerwise, by
  element or whole quaternion (:class:`PruneSpec`, :func:`prune`, :func:`random_like`).
- :mod:`~quatnn.prune.sparsity`: what remains, in the model's own units and in percent
  of the real model's parameters.
- :mod:`~quatnn.prune.lottery`: iterative magnitude pruning with rewinding and its
  controls, one run folder per variant, seed and level (:func:`run_lottery`).

Example:
    >>> import torch
    >>> from quatnn import models, prune
    >>> model = models.create("lenet_300_100", "quaternion")
    >>> masks = prune.prune(model, prune.dense_masks(model), prune.PruneSpec(rate=0.5))
    >>> prune.attach(model, masks)
    >>> round(prune.sparsity(model, masks, reference_params=266610)["real_params"]
    ...       ["percent_remaining"], 1)
    12.8
"""

from quatnn.prune.lottery import (
    CONTROLS,
    LotteryConfig,
    level_dir,
    load_recipe,
    parse_rewind,
    reference_variant,
    run_lottery,
)
from quatnn.prune.masks import (
    LAYER_TYPES,
    MaskCallback,
    attach,
    dense_masks,
    detach,
    enforce,
    layer_types,
    load_masks,
    masks_of,
    prunable_layers,
    save_masks,
)
from quatnn.prune.sparsity import sparsity
from quatnn.prune.strategies import GRANULARITIES, METHODS, SCOPES, PruneSpec, prune, random_like

__all__ = [
    "CONTROLS",
    "GRANULARITIES",
    "LAYER_TYPES",
    "METHODS",
    "SCOPES",
    "LotteryConfig",
    "MaskCallback",
    "PruneSpec",
    "attach",
    "dense_masks",
    "detach",
    "enforce",
    "layer_types",
    "level_dir",
    "load_masks",
    "load_recipe",
    "masks_of",
    "parse_rewind",
    "prunable_layers",
    "prune",
    "random_like",
    "reference_variant",
    "run_lottery",
    "save_masks",
    "sparsity",
]
