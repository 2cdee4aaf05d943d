"""Which weights to prune next: by magnitude or at random, globally or layer by layer,
element by element or whole quaternions.

Every call of :func:`prune` removes a fraction of the weights that *remain*, so ``L``
calls at rate ``p`` leave ``(1 - p)^L`` of them (counts are rounded at each call).

- ``scope="global"``: one ranking over every prunable layer not skipped; the ``rate``
  of all their remaining weights goes, taken from the smallest wherever they are, so a
  layer whose weights are smaller loses more than ``rate`` of its own.
- ``scope="layerwise"``: each layer loses ``rate`` of its own remaining weights, or the
  rate of its type in ``rates`` (``conv``, ``fc``, ``output``; Frankle & Carbin 2019:
  fc 0.2, conv 0.1 or 0.15, output 0.1).
- ``granularity="element"``: every real number on its own, each of r, i, j, k of a
  quaternion weight too (as in Iqbal & Mishra 2023).
- ``granularity="quaternion"``: a quaternion layer loses whole quaternion weights, all
  four components together (structured), ranked by their norm. Real layers fall back to
  element. A quaternion's score is its norm / 2 (the RMS of its components), so a global
  ranking compares it fairly with real weights of the same component size.
- ``method="random"``: the same counts, chosen uniformly at random (a control).

Biases and norm layers are never pruned; ``skip`` names layers or layer types to leave.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from quatnn.prune.masks import dense_masks
    >>> model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    >>> spec = PruneSpec(scope="layerwise", rate=0.2, skip=("output",))
    >>> masks = prune(model, dense_masks(model), spec)
    >>> int(masks["0"].sum()), int(masks["2"].sum())
    (80, 20)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from quatnn.prune.masks import LAYER_TYPES, is_quaternion, layer_types, prunable_layers

__all__ = ["GRANULARITIES", "METHODS", "SCOPES", "PruneSpec", "prune", "random_like"]

METHODS = ("magnitude", "random")
SCOPES = ("global", "layerwise")
GRANULARITIES = ("element", "quaternion")


@dataclass(frozen=True)
class PruneSpec:
    """How one pruning step chooses weights (see the module docstring).

    Args:
        method: ``magnitude`` (smallest absolute values / quaternion norms first) or
            ``random``.
        scope: ``global`` or ``layerwise``.
        rate: fraction of the remaining weights removed per step, in (0, 1).
        rates: layerwise only: per layer type (``conv``, ``fc``, ``output``) rates that
            replace ``rate``; 0 leaves that type dense.
        granularity: ``element`` or ``quaternion``.
        skip: names or types of layers never pruned, e.g. ``("output",)``.
    """

    method: str = "magnitude"
    scope: str = "global"
    rate: float = 0.2
    rates: Mapping[str, float] = field(default_factory=dict)
    granularity: str = "element"
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, value, valid in (
            ("method", self.method, METHODS),
            ("scope", self.scope, SCOPES),
            ("granularity", self.granularity, GRANULARITIES),
        ):
            if value not in valid:
                raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}")
        if not 0 < self.rate < 1:
            raise ValueError(f"rate must be in (0, 1), got {self.rate}")
        if self.rates and self.scope != "layerwise":
            raise ValueError("per-type rates need scope='layerwise' (global uses one rate)")
        for kind, value in self.rates.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if kind not in LAYER_TYPES or not number or not 0 <= value < 1:
                raise ValueError(
                    f"rates must map layer types ({', '.join(LAYER_TYPES)}) to values in "
                    f"[0, 1), got {kind}={value!r}"
                )
        object.__setattr__(self, "skip", tuple(self.skip))

    def rate_of(self, layer_type: str) -> float:
        """The layerwise rate of a layer of ``layer_type``."""
        return self.rates.get(layer_type, self.rate)

    def check(self, model: nn.Module) -> None:
        """ValueError if ``skip`` names neither a prunable layer of ``model`` nor a type."""
        unknown = sorted(set(self.skip) - set(prunable_layers(model)) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"skip names no layer or type of this model: {', '.join(unknown)}")


def _structured(module: nn.Module, granularity: str) -> bool:
    return granularity == "quaternion" and is_quaternion(module)


def _units(name: str, mask: Tensor, structured: bool) -> Tensor:
    """The alive units of a layer: the mask, or one entry per quaternion."""
    if not structured:
        return mask
    if not (mask == mask[0]).all():
        raise ValueError(
            f"quaternion granularity needs whole-quaternion masks, but the mask of {name} "
            "keeps some components of a quaternion and not others"
        )
    return mask[0]


def _scores(
    module: nn.Module, structured: bool, method: str, generator: torch.Generator | None
) -> Tensor:
    weight = module.weight.detach().float().cpu()
    shape = weight.shape[1:] if structured else weight.shape
    if method == "random":
        return torch.rand(shape, generator=generator)
    return weight.norm(dim=0) / 2 if structured else weight.abs()


def _drop_smallest(
    scores: list[Tensor], alive: list[Tensor], sizes: list[int], budget: int
) -> list[Tensor]:
    """New alive masks: the lowest-scoring alive units (ties: first in memory order)
    dropped while the weights they hold add up to at most ``budget``."""
    flat = torch.cat([s[a] for s, a in zip(scores, alive, strict=True)])
    weights = torch.cat(
        [torch.full((int(a.sum()),), size) for a, size in zip(alive, sizes, strict=True)]
    )
    order = torch.argsort(flat, stable=True)
    count = int((torch.cumsum(weights[order], 0) <= budget).sum())
    keep = torch.ones(len(flat), dtype=torch.bool)
    keep[order[:count]] = False
    result = []
    for a, part in zip(alive, torch.split(keep, [int(a.sum()) for a in alive]), strict=True):
        new = a.clone()
        new[a] = part
        result.append(new)
    return result


def prune(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    spec: PruneSpec,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """New masks for every prunable layer of ``model``: ``masks`` (layers missing from it
    count as dense) with ``spec.rate`` of the remaining weights removed, judged on the
    model's current weights (``method="random"`` draws from ``generator``). The model is
    not changed: :func:`quatnn.prune.masks.attach` the result."""
    spec.check(model)
    layers, types = prunable_layers(model), layer_types(model)
    result = {
        name: masks.get(name, torch.ones(m.weight.shape, dtype=torch.bool)).cpu().bool()
        for name, m in layers.items()
    }
    chosen = [n for n in layers if n not in spec.skip and types[n] not in spec.skip]
    structured = {n: _structured(layers[n], spec.granularity) for n in chosen}
    alive = {n: _units(n, result[n], structured[n]) for n in chosen}
    scores = {n: _scores(layers[n], structured[n], spec.method, generator) for n in chosen}
    sizes = {n: 4 if structured[n] else 1 for n in chosen}
    if spec.scope == "global":
        total = sum(int(result[n].sum()) for n in chosen)
        groups = [(chosen, round(spec.rate * total))] if chosen else []
    else:
        groups = [
            ([n], round(spec.rate_of(types[n]) * int(alive[n].sum())) * sizes[n]) for n in chosen
        ]
    for names, budget in groups:
        new = _drop_smallest(
            [scores[n] for n in names], [alive[n] for n in names], [sizes[n] for n in names], budget
        )
        for n, units in zip(names, new, strict=True):
            result[n] = units.expand(result[n].shape).clone() if structured[n] else units
    return result


def random_like(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    granularity: str = "element",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Random masks keeping as many weights in each layer as ``masks`` do (whole
    quaternions in the quaternion layers at ``granularity="quaternion"``): the random
    pruning control of a lottery ticket.

    >>> model = nn.Sequential(nn.Linear(4, 5))
    >>> mask = torch.ones(5, 4, dtype=torch.bool)
    >>> mask[:3] = False
    >>> int(random_like(model, {"0": mask}, generator=torch.Generator().manual_seed(0))["0"].sum())
    8
    """
    layers = prunable_layers(model)
    result = {}
    for name, mask in masks.items():
        structured = _structured(layers[name], granularity)
        units = _units(name, mask.cpu().bool(), structured)
        order = torch.randperm(units.numel(), generator=generator)
        new = torch.zeros(units.numel(), dtype=torch.bool)
        new[order[: int(units.sum())]] = True
        new = new.view(units.shape)
        result[name] = new.expand(mask.shape).clone() if structured else new
    return result
