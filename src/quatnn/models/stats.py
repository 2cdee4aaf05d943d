"""Parameter and multiply-accumulate counts, and the comparison table of the zoo.

Example:
    >>> from torch import nn
    >>> from quatnn.nn import QLinear
    >>> count_macs(nn.Sequential(QLinear(8, 4), nn.Linear(4, 3)), (8,))
    44
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from quatnn.models import registry
from quatnn.nn.attention import MultiheadAttention
from quatnn.nn.base import QuaternionLayer

__all__ = ["count_macs", "count_parameters", "table"]

_REAL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_REAL_LAYERS += (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (each shared parameter once, frozen ones included).

    >>> count_parameters(nn.Linear(4, 3))
    15
    """
    return sum(p.numel() for p in model.parameters())


def _layer_macs(module: nn.Module, x: Tensor, y: Tensor | tuple, key: Tensor | None) -> int:
    """Multiply-accumulates of one call in a forward pass of one sample (so every element
    of ``x`` and ``y`` is the sample's, wherever a layer keeps its batch axis)."""
    if isinstance(module, MultiheadAttention):  # scores and mixing; projections are linear
        seq = 1 if module.batch_first and x.dim() == 3 else 0
        return 2 * x.shape[seq] * key.shape[seq] * module.embed_dim
    if hasattr(module, "in_features"):  # nn.Linear, QLinear: every output reads every input
        return y.numel() * module.in_features
    kernel = math.prod(module.kernel_size)
    if getattr(module, "transposed", False) or getattr(module, "_transposed", False):
        return x.numel() * module.out_channels // module.groups * kernel
    return y.numel() * module.in_channels // module.groups * kernel


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of the linear and convolution layers for one sample of shape
    ``input_shape`` (no batch axis), measured with forward hooks on a batch of one, in eval
    mode and without gradients. Norms, activations, pooling and additions are not counted;
    attention (:class:`~quatnn.nn.attention.MultiheadAttention` and its quaternion form)
    counts its projections as linear layers and ``2 L S E`` for the scores and the mixing
    of the values (``L`` queries, ``S`` keys, ``E`` real features).

    A quaternion layer counts what its ``"block"`` algorithm computes: the real layer of
    the same real sizes, i.e. 16 real MACs per quaternion weight use (``16 * O * I/g * k``
    per output position, sizes in quaternions). A quaternion model therefore reports the
    MACs of the real model of the same widths, but for depthwise layers: a quaternion
    depthwise convolution mixes the 4 components of each channel, 4x the real one's MACs.
    The ``"rank8"`` algorithm needs half of the layer MACs (8 real products per quaternion
    product) plus O(size) additions.
    """
    macs = 0

    def hook(module: nn.Module, args: tuple[Tensor, ...], kwargs: dict, output: Tensor) -> None:
        nonlocal macs
        key = args[1] if len(args) > 1 else kwargs.get("key")  # attention's keys
        macs += _layer_macs(module, args[0] if args else kwargs["query"], output, key)

    handles = [
        m.register_forward_hook(hook, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, _REAL_LAYERS + (QuaternionLayer, MultiheadAttention))
    ]
    modes = {m: m.training for m in model.modules()}
    reference = next(model.parameters(), None)
    kw = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, **kw))
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    return macs


def table(names: Sequence[str] | None = None, variants: Sequence[str] | None = None) -> list[dict]:
    """One row per model and variant at the default options, input size and channels:
    ``name``, ``variant``, ``params``, ``ratio_to_real`` (params over those of the real
    reference: ``real`` for flat models, ``real4`` for image models, rounded to 4 places)
    and ``macs`` (:func:`count_macs`), counted on the meta device. ``variants`` defaults
    to ``("real", "quaternion")`` for flat models and ``("real3", "real4", "quaternion")``
    for image models.

    >>> [row["params"] for row in table(["lenet_300_100"])]
    [266610, 67710]
    """
    rows = []
    for name in dict.fromkeys(registry.names() if names is None else names):
        model_spec = registry.spec(name)
        flat = model_spec.input_kind == "flat"
        reference = model_spec.real_variant
        chosen = variants or (("real", "quaternion") if flat else ("real3", "real4", "quaternion"))
        chosen = tuple(dict.fromkeys(chosen))  # each row once
        counts: dict[str, tuple[int, int]] = {}
        for variant in dict.fromkeys((*chosen, reference)):
            with torch.device("meta"):  # shapes only: no memory, init or arithmetic
                model = registry.create(name, variant)
            shape = (registry.default_in_channels(name, variant), *model_spec.default_input_size)
            counts[variant] = count_parameters(model), count_macs(model, shape)
        for variant in chosen:
            params, macs = counts[variant]
            ratio = round(params / counts[reference][0], 4)
            rows.append(
                {"name": name, "variant": variant, "params": params,
                 "ratio_to_real": ratio, "macs": macs}
            )  # fmt: skip
    return rows
