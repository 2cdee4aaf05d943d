"""Synchronized batch norm: batch statistics over every process of a data-parallel run.

In data-parallel training each process sees only its share of the global batch, so an
ordinary batch norm normalizes with statistics of a fraction of the batch.
:class:`QSyncBatchNorm` computes the statistics of the whole global batch instead, so a
run on ``W`` processes normalizes exactly as one process would on the concatenated batch:

* ``"whiten"``: per quaternion channel the sample count, the sum and (in a second pass,
  after the global mean is known, so nothing cancels) the sum of outer products
  ``(x - mu)(x - mu)^T`` (4x4) are summed over processes; then the mean and covariance.
* ``"variance"``: the count, the sum and the sum of squared norms ``|x - mu|^2``.
* ``"split"``: per real channel the count, the sum and the sum of squares.

The sums go through a differentiable all-reduce (the backward pass all-reduces the
gradients of the statistics), and the rest is written with plain autograd ops, so input,
``weight`` and ``bias`` gradients are those of the single-process layer on the whole
batch (slower than the fused kernels of :mod:`quatnn.nn.norm`; only used with more than
one process). Without a process group, with one process, in eval mode (running
statistics) or with ``track_running_stats=False`` outside training, the layer runs the
ordinary :class:`~quatnn.nn.norm.QBatchNorm2d` code and gives identical results.

:func:`convert_sync_batchnorm` converts a model: quaternion batch norms (every mode) to
:class:`QSyncBatchNorm` and real ``nn.BatchNorm*d`` to :class:`torch.nn.SyncBatchNorm`
(which trains on CUDA devices only). The new layers take over the old ones' parameter
and buffer tensors themselves, and keep their state-dict keys, so checkpoints load into
either form.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from quatnn.nn import QBatchNorm2d, QConv2d
    >>> net = nn.Sequential(QConv2d(4, 8, 3), QBatchNorm2d(8), nn.Conv2d(8, 8, 1))
    >>> net.append(nn.BatchNorm2d(8))  # doctest: +ELLIPSIS
    Sequential(...)
    >>> net = convert_sync_batchnorm(net)
    >>> [type(m).__name__ for m in net]
    ['QConv2d', 'QSyncBatchNorm', 'Conv2d', 'SyncBatchNorm']
    >>> net[1](torch.randn(4, 8, 5, 5)).shape  # no process group: the ordinary layer
    torch.Size([4, 8, 5, 5])
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from quatnn.functional import autocast_disabled
from quatnn.nn.norm import (
    NonFiniteStatistics,
    _compute_dtype,
    _eye4,
    _flagged,
    _memory_format,
    _QBatchNorm,
)

__all__ = ["QSyncBatchNorm", "convert_sync_batchnorm"]


def _all_reduce_sum(tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The sum of ``tensor`` over the processes of ``group``, differentiable: the gradient
    of each process's input is the sum of the output gradients of all processes."""
    try:  # functional collectives: autograd support and torch.compile friendly
        from torch.distributed import _functional_collectives as fc

        if hasattr(fc, "all_reduce_backward"):
            return fc.wait_tensor(fc.all_reduce(tensor, "sum", group))
    except ImportError:  # pragma: no cover - older torch
        pass
    from torch.distributed.nn.functional import all_reduce  # pragma: no cover

    return all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)  # pragma: no cover


class QSyncBatchNorm(_QBatchNorm):
    """Quaternion batch norm whose batch statistics cover all processes of ``process_group``
    (default: the whole world); see the module docs.

    Takes ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)`` inputs; other
    arguments, parameters and buffers as :class:`~quatnn.nn.norm.QBatchNorm1d`. Every
    process must call it the same number of times (it runs collectives), with more than one
    value per channel in all. Usually made by :func:`convert_sync_batchnorm`.
    """

    _input_dims = (2, 3, 4, 5)
    _shape_text = "(N, C, *spatial)"

    def __init__(
        self,
        num_features: int,
        mode: str = "whiten",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, mode, eps, momentum, affine, track_running_stats, device, dtype
        )
        self.process_group = process_group

    def _group(self) -> dist.ProcessGroup | None:
        """The process group to synchronize over, or None when there is nothing to do."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, x: Tensor) -> Tensor:
        use_batch = self.training or not self.track_running_stats
        group = self._group() if use_batch else None
        if group is None:
            return super().forward(x)
        self._check_input(x)
        factor = self._momentum_factor()
        parts = 1 if self.mode == "split" else 4  # components per channel
        channels = self.num_features // parts
        cdt = _compute_dtype(x.dtype)
        with autocast_disabled(x.device.type):
            # (N, parts, C, M), with M given: a process's share of the batch may be empty
            xs = x.to(cdt).reshape(x.shape[0], parts, channels, math.prod(x.shape[2:]))
            # Pass 1: the global count and mean.
            count = xs[:, 0, 0].numel()
            local = torch.cat((xs.sum((0, 3)).reshape(-1), xs.new_full((1,), count)))
            total = _all_reduce_sum(local, group)
            n = total[-1]
            # The global count is at least this process's own: it is read back (a device
            # sync, and a graph break under torch.compile) only when that cannot decide.
            # Processes that read it all see the same value, so they raise alike.
            if count <= 1 and (global_count := int(n.item())) <= 1:
                raise ValueError(
                    f"{type(self).__name__}: expected more than 1 value per channel in the "
                    f"global batch when using batch statistics, got {global_count}"
                )
            mean = total[:-1].view(1, parts, channels, 1) / n
            d = xs - mean
            # Pass 2: centered second moments.
            if self.mode == "whiten":
                second = torch.einsum("nicm,njcm->cij", d, d)  # (C, 4, 4)
            else:  # squared norms (variance: (C,)) or squares (split: (4C,))
                second = d.square().sum((0, 1, 3))
            stat = _all_reduce_sum(second, group) / n  # biased
            y, bad = self._normalize(d, stat, cdt)
            # One device sync per call, as the single-process norms; traced, no check
            # (one graph): non-finite statistics give non-finite outputs, as nn.BatchNorm.
            if not torch.compiler.is_compiling() and _flagged(bad):  # every process alike
                raise NonFiniteStatistics()
            if self.bias is not None:
                y = y + self.bias.to(cdt).view(1, parts, channels, 1)
        if self.training and self.track_running_stats:  # traced: bad statistics change nothing
            traced_bad = bad if torch.compiler.is_compiling() else None
            self._update_running(mean.reshape(-1), stat, n, factor, traced_bad)
        out = y.reshape(x.shape).to(x.dtype)
        return out.contiguous(memory_format=_memory_format(x))

    def _normalize(self, d: Tensor, stat: Tensor, cdt: torch.dtype) -> tuple[Tensor, Tensor]:
        """``d`` (centered, ``(N, parts, C, M)``) normalized with the batch statistic
        ``stat`` and scaled by ``weight`` (no shift), and whether ``stat`` is unusable
        (non-finite, or a covariance + eps I that is not positive definite)."""
        bad = torch.isfinite(stat.detach()).all().logical_not()  # not of a sum: no overflow
        if self.mode == "whiten":
            eye = _eye4(cdt, d.device)
            chol, info = torch.linalg.cholesky_ex(stat + self.eps * eye)
            w = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
            m = self._gamma_matrix(cdt, d.device).to(cdt) @ w  # (C, 4, 4)
            return torch.einsum("cij,njcm->nicm", m, d), bad | info.any()
        scale = torch.rsqrt(stat + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(cdt)
        return d * scale.view(1, 1, -1, 1), bad


def _sync_copy(module: _QBatchNorm, process_group: dist.ProcessGroup | None) -> QSyncBatchNorm:
    """A :class:`QSyncBatchNorm` holding ``module``'s own parameter and buffer tensors."""
    ref = next(iter(module.parameters()), None)
    if ref is None:
        ref = next(iter(module.buffers()), None)
    new = QSyncBatchNorm(
        module.num_features,
        mode=module.mode,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        process_group=process_group,
        device=None if ref is None else ref.device,
        dtype=None if ref is None or not ref.is_floating_point() else ref.dtype,
    )
    for name, param in module.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, buf in module.named_buffers(recurse=False):
        setattr(new, name, buf)
    new.train(module.training)
    return new


def convert_sync_batchnorm(
    module: nn.Module, process_group: dist.ProcessGroup | None = None
) -> nn.Module:
    """Replace every quaternion batch norm by a :class:`QSyncBatchNorm` and every real
    ``nn.BatchNorm1d/2d/3d`` by :class:`torch.nn.SyncBatchNorm`, in place; returns the
    model (a new module when ``module`` itself is a batch norm).

    The new layers share the old ones' parameters and buffers (the same tensors), mode,
    ``eps``, ``momentum``, flags and training mode, so an optimizer made before still
    updates them and state dicts keep their keys.
    """
    return _convert_quaternion(
        nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group), process_group
    )


def _convert_quaternion(module: nn.Module, process_group: dist.ProcessGroup | None) -> nn.Module:
    if isinstance(module, _QBatchNorm) and not isinstance(module, QSyncBatchNorm):
        return _sync_copy(module, process_group)
    for name, child in module.named_children():
        converted = _convert_quaternion(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
