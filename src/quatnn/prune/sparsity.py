"""Sparsity accounting: what remains of each layer, of the prunable weights, of all the
model's parameters and, for a quaternion model, of its real counterpart's parameters.

The last is the x axis of Iqbal & Mishra (2023): a quaternion model starts at ~25% of
the real model's parameters, so pruned real and quaternion models compare by how many
parameters they keep. Biases and norm parameters are never pruned and count as kept.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from quatnn.prune.masks import dense_masks
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> masks = dense_masks(model)
    >>> masks["0"][:2] = False
    >>> report = sparsity(model, masks, reference_params=44)
    >>> report["prunable"], report["real_params"]["percent_remaining"]
    ({'weights': 24, 'remaining': 16, 'percent_remaining': 66.66666666666667}, 50.0)
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from quatnn.prune.masks import is_quaternion, layer_types, prunable_layers

__all__ = ["sparsity"]


def _count(total: int, remaining: int) -> dict:
    return {"weights": total, "remaining": remaining, "percent_remaining": 100 * remaining / total}


def sparsity(
    model: nn.Module, masks: Mapping[str, Tensor], reference_params: int | None = None
) -> dict:
    """JSON-ready counts of ``model`` under ``masks`` (layers missing from ``masks`` are
    dense): ``layers`` (name, type, quaternion, weights, remaining, percent_remaining),
    ``prunable`` (the same over all prunable weights), ``params`` (``total``,
    ``remaining``, ``percent_remaining`` of every parameter) and, when
    ``reference_params`` (the real model's parameter count) is given, ``real_params``
    (``total`` and ``percent_remaining``: remaining parameters over it)."""
    types = layer_types(model)
    layers = []
    for name, module in prunable_layers(model).items():
        total = module.weight.numel()
        remaining = int(masks[name].sum()) if name in masks else total
        layers.append(
            {
                "name": name,
                "type": types[name],
                "quaternion": is_quaternion(module),
                **_count(total, remaining),
            }
        )
    pruned = sum(layer["weights"] - layer["remaining"] for layer in layers)
    total = sum(p.numel() for p in model.parameters())
    report = {
        "layers": layers,
        "prunable": _count(sum(x["weights"] for x in layers), sum(x["remaining"] for x in layers)),
        "params": {
            "total": total,
            "remaining": total - pruned,
            "percent_remaining": 100 * (total - pruned) / total,
        },
    }
    if reference_params is not None:
        report["real_params"] = {
            "total": reference_params,
            "percent_remaining": 100 * (total - pruned) / reference_params,
        }
    return report
