"""Fold a quaternion model into a plain real one with the same outputs (eval mode).

:func:`fold` returns a deep copy in which

* every :class:`~quatnn.nn.QLinear` / ``QConv{1,2,3}d`` / ``QConvTranspose{1,2,3}d`` is the
  ``torch.nn`` layer holding the folded real weight (:func:`quatnn.functional.block_weight`);
  with ``groups > 1`` the real grouped layer sits between two fixed channel permutations
  (:class:`~quatnn.export.modules.PermutedConv`), as the folded channels are group-major;
* every batch norm (quaternion, any mode, or ``torch.nn``) that directly follows a
  linear/convolution layer in an ``nn.Sequential`` is folded into that layer's weight and
  bias (``fuse_norms=True``, the default). In the zoo every norm follows its convolution
  this way, so folded zoo models hold no norm layers at all;
* any other quaternion batch norm becomes its eval-mode affine map: ``whiten`` a
  :class:`~quatnn.export.modules.QuaternionAffine` (a 4x4 matrix per quaternion channel
  plus a shift), ``variance`` and ``split`` an ``nn.BatchNorm{1,2,3}d`` with the same
  statistics (real ``nn.BatchNorm`` layers are kept);
* :class:`~quatnn.nn.QDropout` and the ``nn.Dropout`` family become ``nn.Identity``;
* ``QAdaptiveMaxPool{1,2,3}d`` becomes :class:`~quatnn.export.modules.NormAdaptiveMaxPool`
  (ONNX has no adaptive max pool with indices unless the sizes divide), except with
  ``return_indices=True`` (kept: the indices have no other form);
* ``QMaxPool{1,2,3}d``, :class:`~quatnn.nn.QModReLU` and
  :class:`~quatnn.nn.norm.QLayerNorm` are kept: they are plain torch operations that export
  as they are (the max pool's indices map to ONNX ``MaxPool`` + ``GatherElements``);
* :class:`~quatnn.nn.QMultiheadAttention` and :class:`~quatnn.nn.QTransformerEncoderLayer`
  are kept with their projections, feed-forward layers and dropouts folded as above (the
  rest of them is plain torch operations).

Statistics and weights are combined in float64 and cast back to the layer's dtype.

Example:
    >>> import torch
    >>> from quatnn import models
    >>> model = models.create("resnet20", "quaternion").eval()
    >>> real = fold(model)
    >>> x = torch.randn(2, 4, 32, 32)
    >>> torch.allclose(real(x), model(x), atol=1e-4)
    True
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quatnn import functional as QF
from quatnn.export.modules import NormAdaptiveMaxPool, PermutedConv, QuaternionAffine
from quatnn.nn import (
    QAdaptiveMaxPool1d,
    QAdaptiveMaxPool2d,
    QAdaptiveMaxPool3d,
    QDropout,
    QLinear,
    QMaxPool1d,
    QMaxPool2d,
    QMaxPool3d,
    QModReLU,
)
from quatnn.nn.attention import MultiheadAttention, TransformerEncoderLayer
from quatnn.nn.base import QuaternionLayer
from quatnn.nn.conv import _QConvNd, _QConvTransposeNd
from quatnn.nn.norm import QBatchNorm1d, QBatchNorm2d, QBatchNorm3d, QLayerNorm, _QBatchNorm

__all__ = ["fold", "is_quaternion_module", "SUPPORTED"]

_DROPOUTS = (
    QDropout,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_REAL_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ADAPTIVE = {QAdaptiveMaxPool1d: 1, QAdaptiveMaxPool2d: 2, QAdaptiveMaxPool3d: 3}
_KEPT = (QMaxPool1d, QMaxPool2d, QMaxPool3d, QModReLU, QLayerNorm)
_KEPT += (MultiheadAttention, TransformerEncoderLayer)  # and their quaternion forms
_REAL_BN_OF = {
    QBatchNorm1d: nn.BatchNorm1d,
    QBatchNorm2d: nn.BatchNorm2d,
    QBatchNorm3d: nn.BatchNorm3d,
}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
# Upper-triangle index of each (row, col) of the symmetric Gamma (quatnn.nn.norm layout).
_SYM_INDEX = (0, 1, 2, 3, 1, 4, 5, 6, 2, 5, 7, 8, 3, 6, 8, 9)
_FUSABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *_CONV_T.values(), PermutedConv)

SUPPORTED = (
    "QLinear, QConv1d/2d/3d, QConvTranspose1d/2d/3d, QBatchNorm1d/2d/3d (with running "
    "statistics), QDropout, QMaxPool1d/2d/3d, QAdaptiveMaxPool1d/2d/3d, QModReLU, QLayerNorm, "
    "QMultiheadAttention, QTransformerEncoderLayer"
)
"""The quatnn modules :func:`fold` knows (named in its errors)."""


def is_quaternion_module(module: nn.Module) -> bool:
    """True for the modules :func:`fold` replaces: weighted quaternion layers, quaternion
    batch norms, quaternion dropout and the quaternion adaptive max pools."""
    return isinstance(module, (QuaternionLayer, _QBatchNorm, QDropout, *_ADAPTIVE))


def _plain(module: nn.Module, base: type) -> bool:
    """``module`` is a ``base`` whose forward is ``base``'s own (a subclass that changes
    the computation cannot be folded blindly)."""
    return isinstance(module, base) and type(module).forward is base.forward


def _plain_conv(module: nn.Module) -> bool:
    return _plain(module, _QConvNd) or _plain(module, _QConvTransposeNd)


def _unsupported(model: nn.Module) -> list[str]:
    bad = []
    for name, module in model.named_modules():
        known = (
            _plain(module, QLinear)
            or _plain(module, nn.Linear)  # e.g. the real attention's projections
            or _plain_conv(module)
            or _plain(module, _QBatchNorm)
            or isinstance(module, _DROPOUTS + _KEPT + tuple(_ADAPTIVE))
        )
        if known:
            continue
        kind = type(module)
        if isinstance(module, QuaternionLayer | _QBatchNorm) or kind.__module__.startswith(
            "quatnn.nn"
        ):
            bad.append(f"{name or '<root>'} ({kind.__name__})")
    return bad


# --------------------------------------------------------------------------- layers


def _group_major_index(channels: int, groups: int) -> Tensor:
    """``index`` with ``x.index_select(1, index)`` = the group-major order of blocked ``x``."""
    return QF._to_group_major(torch.arange(channels).view(1, channels), groups)[0]


def _blocked_index(channels: int, groups: int) -> Tensor:
    return QF._from_group_major(torch.arange(channels).view(1, channels), groups)[0]


def _linear(layer: QLinear) -> nn.Linear:
    w = layer.weight
    real = nn.Linear(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        device=w.device,
        dtype=w.dtype,
    )
    with torch.no_grad():
        real.weight.copy_(QF.block_weight(w))
        if layer.bias is not None:
            real.bias.copy_(layer.bias)
    return real


def _conv(layer: _QConvNd) -> nn.Module:
    w, groups = layer.weight, layer.groups
    kw = {
        "stride": layer.stride,
        "padding": layer.padding,
        "dilation": layer.dilation,
        "groups": groups,
        "bias": layer.bias is not None,
        "device": w.device,
        "dtype": w.dtype,
    }
    if layer._transposed:
        real = _CONV_T[layer._nd](
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            output_padding=layer.output_padding,
            **kw,
        )
    else:
        real = _CONV[layer._nd](
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            padding_mode=layer.padding_mode,
            **kw,
        )
    with torch.no_grad():
        real.weight.copy_(QF.block_weight(w, groups, layer._transposed))
        if layer.bias is not None:
            bias = layer.bias
            if groups > 1:  # the real layer's outputs are group-major
                bias = bias[_group_major_index(layer.out_channels, groups).to(bias.device)]
            real.bias.copy_(bias)
    if groups == 1:
        return real
    device = w.device
    return PermutedConv(
        real,
        _group_major_index(layer.in_channels, groups).to(device),
        _blocked_index(layer.out_channels, groups).to(device),
    )


# --------------------------------------------------------------------------- norms


@dataclass
class _Affine:
    """The eval-mode map of a batch norm on blocked channels: ``y = A x + shift`` with
    ``A`` the per quaternion channel ``matrix (C, 4, 4)`` or the diagonal ``scale (4C,)``."""

    shift: Tensor
    matrix: Tensor | None = None
    scale: Tensor | None = None

    def rows(self, weight: Tensor) -> Tensor:
        """``A @ weight`` for ``weight (4C, K)`` (rows in blocked order)."""
        if self.matrix is None:
            return self.scale.unsqueeze(1) * weight
        c = self.matrix.shape[0]
        mixed = torch.einsum("cab,bck->ack", self.matrix, weight.reshape(4, c, -1))
        return mixed.reshape(weight.shape)


def _norm_affine(norm: nn.Module, name: str) -> _Affine:
    """The float64 affine map of batch norm ``norm`` in eval mode."""
    if getattr(norm, "running_mean", None) is None:
        raise ValueError(
            f"fold: {name} ({type(norm).__name__}) has no running statistics "
            "(track_running_stats=False), so in eval mode it normalizes with batch statistics "
            "and is no fixed affine map; it cannot be folded (export the model unfolded "
            "instead, e.g. to pt2)"
        )
    f64 = torch.float64
    mean = norm.running_mean.to(f64)
    n = mean.numel()
    ones = torch.ones(n, dtype=f64, device=mean.device)
    beta = torch.zeros_like(ones) if norm.bias is None else norm.bias.detach().to(f64)
    mode = getattr(norm, "mode", "split") if isinstance(norm, _QBatchNorm) else "split"
    if mode == "whiten":
        c = n // 4
        eye = torch.eye(4, dtype=f64, device=mean.device)
        chol, info = torch.linalg.cholesky_ex(norm.running_cov.to(f64) + norm.eps * eye)
        if bool((info != 0).any()):
            raise ValueError(
                f"fold: {name} ({type(norm).__name__}): running_cov + eps*I is not positive "
                "definite (non-finite or corrupted running statistics)"
            )
        inv = torch.linalg.solve_triangular(chol, eye.expand(c, 4, 4), upper=False)
        if norm.weight is None:
            gamma = eye.expand(c, 4, 4)
        else:
            gamma = norm.weight.detach().to(f64)[:, list(_SYM_INDEX)].view(c, 4, 4)
        matrix = gamma @ inv
        center = mean.view(4, c).t().unsqueeze(-1)  # (C, 4, 1)
        shift = beta - (matrix @ center).squeeze(-1).t().reshape(-1)
        return _Affine(shift, matrix=matrix)
    var = norm.running_var.to(f64)
    gamma = None if norm.weight is None else norm.weight.detach().to(f64)
    if mode == "variance":  # one variance and one gamma per quaternion channel
        var = var.repeat(4)
        gamma = None if gamma is None else gamma.repeat(4)
    scale = torch.rsqrt(var + norm.eps) * (ones if gamma is None else gamma)
    return _Affine(beta - scale * mean, scale=scale)


def _fuse(layer: nn.Module, affine: _Affine) -> None:
    """Fold ``affine`` (acting on the blocked outputs of ``layer``) into ``layer``'s weight
    and bias, in place."""
    conv = layer.conv if isinstance(layer, PermutedConv) else layer
    w = conv.weight
    out = affine.shift.numel()
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    groups = getattr(conv, "groups", 1)
    f64 = w.detach().to(torch.float64)
    if transposed:  # (in, out/g, *k) -> (out, in/g * k)
        rows = f64.unflatten(0, (groups, -1)).transpose(1, 2).reshape(out, -1)
    else:
        rows = f64.reshape(out, -1)
    bias = torch.zeros_like(affine.shift) if conv.bias is None else conv.bias.detach().to(f64)
    order = layer.permute_out.index if isinstance(layer, PermutedConv) else None
    if order is not None:  # real output order -> blocked order
        rows, bias = rows[order], bias[order]
    rows = affine.rows(rows)
    bias = affine.rows(bias.unsqueeze(1)).squeeze(1) + affine.shift
    if order is not None:
        rows, bias = rows.index_copy(0, order, rows), bias.index_copy(0, order, bias)
        # index_copy(0, order, x) puts x[i] at order[i]: blocked i -> real order[i]
    if transposed:
        k = w.shape[2:]
        weight = rows.view(groups, out // groups, w.shape[0] // groups, *k).transpose(1, 2)
        weight = weight.reshape(w.shape)
    else:
        weight = rows.view(w.shape)
    conv.weight = nn.Parameter(weight.to(w.dtype), requires_grad=w.requires_grad)
    conv.bias = nn.Parameter(bias.to(w.dtype), requires_grad=w.requires_grad)


def _standalone(norm: nn.Module, name: str) -> nn.Module:
    """A quaternion batch norm as plain modules (eval mode)."""
    affine = _norm_affine(norm, name)
    ref = norm.running_mean
    if norm.mode == "whiten":
        return QuaternionAffine(affine.matrix.to(ref.dtype), affine.shift.to(ref.dtype)).to(
            ref.device
        )
    real_cls = next(r for q, r in _REAL_BN_OF.items() if isinstance(norm, q))
    real = real_cls(norm.num_features, eps=norm.eps, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        repeat = 4 if norm.mode == "variance" else 1
        real.running_mean.copy_(norm.running_mean)
        real.running_var.copy_(norm.running_var.repeat(repeat))
        if norm.weight is not None:
            real.weight.copy_(norm.weight.repeat(repeat))
        if norm.bias is not None:  # else zero, as the real norm starts
            real.bias.copy_(norm.bias)
    return real.eval()


# --------------------------------------------------------------------------- the walk


def _replace(module: nn.Module, name: str) -> nn.Module | None:
    """The replacement of a leaf ``module``, or None to keep it (and walk into it)."""
    if _plain(module, QLinear):
        return _linear(module)
    if _plain_conv(module):
        return _conv(module)
    if isinstance(module, _DROPOUTS):
        return nn.Identity()
    for cls, nd in _ADAPTIVE.items():
        if isinstance(module, cls) and not module.return_indices:  # else kept as it is
            return NormAdaptiveMaxPool(nd, module.output_size)
    return None


def _out_features(layer: nn.Module) -> int:
    conv = layer.conv if isinstance(layer, PermutedConv) else layer
    return conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels


def _fusable(layer: nn.Module, norm: nn.Module) -> bool:
    """``norm`` is a batch norm over the output channels of the linear/conv ``layer``."""
    is_norm = isinstance(norm, _REAL_NORMS) or _plain(norm, _QBatchNorm)
    return is_norm and isinstance(layer, _FUSABLE) and norm.num_features == _out_features(layer)


def _walk(module: nn.Module, prefix: str, fuse_norms: bool) -> None:
    for name, child in list(module.named_children()):
        new = _replace(child, prefix + name)
        if new is None:
            _walk(child, f"{prefix}{name}.", fuse_norms)
        else:
            setattr(module, name, new)
    if fuse_norms and isinstance(module, nn.Sequential):
        names = [name for name, _ in module.named_children()]
        for first, second in zip(names, names[1:], strict=False):
            layer, norm = module._modules[first], module._modules[second]
            if _fusable(layer, norm):
                _fuse(layer, _norm_affine(norm, prefix + second))
                module._modules[second] = nn.Identity()
    for name, child in list(module.named_children()):
        if _plain(child, _QBatchNorm):
            setattr(module, name, _standalone(child, prefix + name))


def fold(model: nn.Module, *, fuse_norms: bool = True) -> nn.Module:
    """A deep copy of ``model`` (in eval mode) made of plain ``torch.nn`` layers and the
    small modules of :mod:`quatnn.export.modules`, computing the same function (within
    float rounding). See the module docs for what each layer becomes.

    Args:
        model: a model in eval mode (``model.eval()``): batch norms are folded with their
            running statistics and dropout is removed.
        fuse_norms: fold each batch norm that directly follows a linear or convolution
            layer in an ``nn.Sequential`` into that layer (real ``nn.BatchNorm`` too);
            ``False`` keeps every norm as its own (affine) module.

    Raises:
        ValueError: the model is in training mode; or it holds quatnn modules that cannot
            be folded (each is named with its path and type); or a batch norm without
            running statistics.
    """
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"fold: the model must be in eval mode (batch norms fold their running "
            f"statistics, dropout is dropped); call model.eval() first ({len(training)} "
            f"module(s) in training mode, e.g. {training[0]})"
        )
    bad = _unsupported(model)
    if bad:
        raise ValueError(
            f"fold: cannot fold {', '.join(bad)}: no real equivalent is known for "
            f"{'this module' if len(bad) == 1 else 'these modules'}. Supported quatnn "
            f"modules: {SUPPORTED}"
        )
    folded = copy.deepcopy(model)
    replaced = _replace(folded, "")
    if replaced is not None:
        folded = replaced
    elif _plain(folded, _QBatchNorm):
        folded = _standalone(folded, "<root>")
    else:
        _walk(folded, "", fuse_norms)
    return folded.eval()
