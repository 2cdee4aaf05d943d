"""Pruning masks that live beside the single ``weight`` of every prunable layer.

A mask is a boolean tensor of the weight's shape (True: kept). :func:`attach` stores it
on the layer as the buffer ``weight_mask``, zeros the pruned weights and registers a
gradient hook that zeros their gradient; :func:`enforce` zeros them again and belongs
after every optimizer step (:class:`MaskCallback` does both in a training loop). With
the two, neither a gradient nor an optimizer's state (momentum, Adam moments, weight
decay) can revive a pruned weight. The buffer is not part of the state dict, so
checkpoints of a masked model load into a plain one.

A masked model pickles and copies whole (``torch.save(model)``, ``copy.deepcopy``) and
stays masked: PyTorch copies and pickles a weight without its gradient hooks, so a
forward pre-hook of the layer, copied with it, registers the gradient hook on the
layer's weight at each forward with gradients enabled where that weight lacks it.

Prunable layers are ``nn.Linear``, real (transposed) convolutions and the quaternion
layers; biases and norm layers are never pruned. Each has a type: ``conv``, ``fc``, or
``output`` for the last prunable layer (the classifier head of every zoo model).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> masks = dense_masks(model)
    >>> masks["0"][0] = False
    >>> attach(model, masks)
    >>> model[0].weight[0].abs().sum().item(), layer_types(model)
    (0.0, {'0': 'fc', '2': 'output'})
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from quatnn.nn.base import QuaternionLayer
from quatnn.train.checkpoint import write_atomic
from quatnn.train.loop import Callback, Trainer

__all__ = [
    "LAYER_TYPES",
    "MaskCallback",
    "attach",
    "dense_masks",
    "detach",
    "enforce",
    "is_quaternion",
    "layer_types",
    "load_masks",
    "masks_of",
    "prunable_layers",
    "save_masks",
]

LAYER_TYPES = ("conv", "fc", "output")
"""Types of prunable layers, the keys of per-type pruning rates."""

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d)
_CONVS += (nn.ConvTranspose3d,)
_HOOK = "_prune_mask_hook"


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The prunable layers of ``model`` by qualified name, in registration order."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, QuaternionLayer) + _CONVS)
    }


def is_quaternion(module: nn.Module) -> bool:
    """Whether ``module`` holds a quaternion ``weight`` (leading axis r, i, j, k)."""
    return isinstance(module, QuaternionLayer)


def layer_types(model: nn.Module) -> dict[str, str]:
    """``conv``, ``fc`` or ``output`` (the last prunable layer) for each prunable layer."""
    layers = prunable_layers(model)
    last = next(reversed(layers), None)
    return {
        name: "output" if name == last else ("fc" if hasattr(m, "in_features") else "conv")
        for name, m in layers.items()
    }


def dense_masks(model: nn.Module) -> dict[str, Tensor]:
    """All-True masks (nothing pruned) for every prunable layer, on the CPU."""
    return {
        name: torch.ones(m.weight.shape, dtype=torch.bool)
        for name, m in prunable_layers(model).items()
    }


def _checked(model: nn.Module, masks: dict[str, Tensor]) -> dict[str, nn.Module]:
    layers = prunable_layers(model)
    unknown = sorted(set(masks) - set(layers))
    if unknown:
        raise ValueError(f"masks for layers the model lacks: {', '.join(unknown)}")
    for name, mask in masks.items():
        if mask.shape != layers[name].weight.shape:
            raise ValueError(
                f"mask of {name} has shape {tuple(mask.shape)}, its weight "
                f"{tuple(layers[name].weight.shape)}"
            )
    return layers


def _mask_grad(module: nn.Module, grad: Tensor) -> Tensor:
    """The gradient hook: reads the layer's current mask (so it follows ``module.to()``)."""
    return grad * module.weight_mask


class _GradMask:
    """The forward pre-hook of a masked layer, kept as its attribute ``_prune_mask_hook``:
    registers the gradient hook on the layer's weight where that weight lacks it.

    Which weight holds the gradient hook is known only to this object and is neither
    pickled nor copied: a copy of the layer (whose weight PyTorch copies without hooks)
    gets a copy of this pre-hook that hooks the copy's weight at its first forward."""

    def __init__(self, module: nn.Module) -> None:
        self._hooked: Tensor | None = None  # the weight holding the gradient hook
        self._grad_hook: RemovableHandle | None = None
        self.handle = module.register_forward_pre_hook(self)

    def __getstate__(self) -> dict:
        return {"handle": self.handle}

    def __setstate__(self, state: dict) -> None:
        self.handle = state["handle"]
        self._hooked = self._grad_hook = None

    def __call__(self, module: nn.Module, args: object = ()) -> None:
        if torch.is_grad_enabled():
            self.hook(module)

    def hook(self, module: nn.Module) -> None:
        """Register the gradient hook on ``module.weight`` unless it holds it already (or
        needs none: it does not require grad)."""
        weight = module.weight
        if weight is self._hooked or not weight.requires_grad:
            return
        self._unhook()
        self._grad_hook = weight.register_hook(partial(_mask_grad, module))
        self._hooked = weight

    def _unhook(self) -> None:
        if self._grad_hook is not None:
            self._grad_hook.remove()
        self._hooked = self._grad_hook = None

    def remove(self) -> None:
        """Remove the gradient hook and this pre-hook."""
        self._unhook()
        self.handle.remove()


def attach(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Mask the layers named in ``masks`` (replacing masks attached before): store each
    mask as the layer's ``weight_mask`` buffer on the weight's device, zero the pruned
    weights in place and zero their gradient from now on. Layers not named keep theirs.
    Attaching again, also to a copy of a masked model, adds no second hook."""
    layers = _checked(model, masks)
    for name, mask in masks.items():
        module = layers[name]
        module.register_buffer(
            "weight_mask", mask.to(module.weight.device, torch.bool), persistent=False
        )
        hook = getattr(module, _HOOK, None)
        if hook is None:
            hook = _GradMask(module)
            setattr(module, _HOOK, hook)
        hook.hook(module)
    enforce(model)


def detach(model: nn.Module) -> None:
    """Remove every mask and gradient hook (the weights stay as they are)."""
    for module in prunable_layers(model).values():
        if hasattr(module, _HOOK):
            getattr(module, _HOOK).remove()
            delattr(module, _HOOK)
        module._buffers.pop("weight_mask", None)


@torch.no_grad()
def enforce(model: nn.Module) -> None:
    """Zero every masked layer's pruned weights in place (call after optimizer steps)."""
    for module in prunable_layers(model).values():
        mask = getattr(module, "weight_mask", None)
        if mask is not None:
            module.weight.mul_(mask)


def masks_of(model: nn.Module) -> dict[str, Tensor]:
    """The masks attached to ``model``, on the CPU, by layer name."""
    return {
        name: m.weight_mask.cpu()
        for name, m in prunable_layers(model).items()
        if getattr(m, "weight_mask", None) is not None
    }


def save_masks(path: str | Path, masks: dict[str, Tensor]) -> None:
    """Write ``masks`` (boolean CPU tensors by layer name) atomically with ``torch.save``."""
    payload = {name: mask.cpu().bool() for name, mask in masks.items()}
    write_atomic(path, lambda f: torch.save(payload, f))


def load_masks(path: str | Path) -> dict[str, Tensor]:
    """Read what :func:`save_masks` wrote (``weights_only``: a foreign file runs no code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class MaskCallback(Callback):
    """Keeps ``masks`` applied through :meth:`quatnn.train.loop.Trainer.fit`: attaches them
    when training starts (also after a resume) and re-zeros pruned weights after every
    optimizer step.

    Example:
        >>> from quatnn import train  # doctest: +SKIP
        >>> train.train(cfg, "runs/masked", callbacks=[MaskCallback(masks)])  # doctest: +SKIP
    """

    def __init__(self, masks: dict[str, Tensor]) -> None:
        self.masks = masks

    def on_train_start(self, trainer: Trainer) -> None:
        attach(trainer.model, self.masks)

    def on_step_end(self, trainer: Trainer) -> None:
        enforce(trainer.model)
