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

Input gradients are those of the single-process layer on the whole batch (the backward
pass all-reduces the sums it needs); ``weight`` and ``bias`` gradients are each process's
own share, which DDP sums up (averages) with the other parameters' gradients. Two backends:

* Where the single-process norms run the fused Triton kernels (CUDA;
  :func:`quatnn.nn.norm.triton_norms`), the whiten and variance modes run them too
  (:mod:`quatnn.nn.norm_triton`), step by step: forward, one sums sweep per process gives
  its count, mean and centred 4x4 moments, two small all-reduces combine them (the mean
  first, then each process's moments moved to it, as in Chan et al.'s pairwise update),
  one program does the 4x4 algebra and one map sweep writes the output; backward, one
  cross-sums sweep, one all-reduce, one program, one map sweep.
* Elsewhere, in the split mode and while torch.compile traces (one graph): the sums go
  through a differentiable all-reduce and the rest is plain autograd ops (the global mean
  first, then the centred second moments in a second pass).

Without a process group, with one process, in eval mode (running statistics) or with
``track_running_stats=False`` outside training, the layer runs the ordinary
:class:`~quatnn.nn.norm.QBatchNorm2d` code and gives identical results.

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
from types import ModuleType

import torch
import torch.distributed as dist
from torch import Tensor, nn

from quatnn.functional import _memory_format, autocast_disabled
from quatnn.nn import norm
from quatnn.nn.norm import (
    NonFiniteStatistics,
    _compute_dtype,
    _count,
    _cq_to_blocked,
    _flagged,
    _QBatchNorm,
    _whitening_map,
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


def _all_reduce_(tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Sum ``tensor`` over the processes of ``group`` in place (no autograd); returns it."""
    dist.all_reduce(tensor, group=group)
    return tensor


class _SyncFused(torch.autograd.Function):
    """Training-mode whiten/variance norm over a process group with the Triton kernels
    (:mod:`quatnn.nn.norm_triton`), called step by step around the all-reduces.

    Forward: one sums sweep gives this process's mean and centred second moments; two
    all-reduces combine them (the global mean first, then each process's moments moved to
    it: ``sum_k M2_k + n_k (m_k - mu)(m_k - mu)^T``); one program does the 4x4 algebra and
    one map sweep writes the output. Backward: one cross-sums sweep, one all-reduce, one
    program for the gradient's matrices, one map sweep. The parameter gradients are this
    process's own share (DDP sums them up), as in ``nn.SyncBatchNorm``. First order only
    (the PyTorch-ops path, taken under torch.compile, also gives double backward).

    ``weight`` is ``Gamma`` ``(C, 4, 4)`` (whiten) or ``gamma`` ``(C,)``; returns
    ``(y, mean blocked (4C,), statistic (biased covariance or E|x - mu|^2), global count)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor,
        beta: Tensor,
        eps: float,
        whiten: bool,
        group: dist.ProcessGroup,
        kernels: ModuleType,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cdt, c, count = _compute_dtype(x.dtype), beta.shape[0] // 4, _count(x)
        with autocast_disabled(x.device.type):
            weightc, betac = weight.to(cdt), beta.to(cdt)
            if count:
                mean, m2 = kernels.moments(x, c, cdt)
            else:
                mean, m2 = x.new_zeros(c, 4, dtype=cdt), x.new_zeros(c, 4, 4, dtype=cdt)
            local = torch.cat((mean.flatten() * count, mean.new_full((1,), count)))
            total = _all_reduce_(local, group)
            n = total[-1]
            _check_count(count, n)
            mu = total[:-1].view(c, 4) / n
            moved = (mean - mu) * math.sqrt(count)
            cov = _all_reduce_(torch.baddbmm(m2, moved.unsqueeze(-1), moved.unsqueeze(-2)), group)
            mu = _cq_to_blocked(mu)
            stat, inv, mm, bad = kernels.maps(whiten, mu, cov / n, weightc, eps)
            if _flagged(bad):  # one sync per call, every process alike
                raise NonFiniteStatistics()
            y = kernels.affine(x, mm, mu, betac) if count else torch.empty_like(x)
        ctx.save_for_backward(x, weightc, mu, inv, mm, n)
        ctx.meta = (whiten, group, kernels, weight.dtype, beta.dtype)
        ctx.mark_non_differentiable(mu, stat, n)
        ctx.set_materialize_grads(False)
        return y, mu, stat, n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor | None, *_stats: Tensor | None):  # type: ignore[override]
        if dy is None:  # only the statistics had gradients: zero
            return (None,) * 7
        x, weight, mu, inv, mm, n = ctx.saved_tensors
        whiten, group, kernels, weight_dtype, beta_dtype = ctx.meta
        c = mu.shape[0] // 4
        with autocast_disabled(x.device.type):
            sums = kernels.cross_sums(dy, x, mu) if _count(x) else mu.new_zeros(c, 20)
            p = sums[:, :16].view(c, 4, 4)  # sum dy (x - mu)^T, then sum dy: this process's
            dweight = torch.bmm(p, inv.mT) if whiten else _trace(p) * inv
            dbeta = _cq_to_blocked(sums[:, 16:])
            means = _all_reduce_(sums, group) / n
            mat_a, mat_b, shift = kernels.gradient_maps(whiten, means, (inv, weight, mm))
            dx = kernels.affine(x, mat_b, mu, shift, mat_a, dy) if _count(x) else None
        return dx, dweight.to(weight_dtype), dbeta.to(beta_dtype), None, None, None, None


def _trace(m: Tensor) -> Tensor:
    """Traces ``(C,)`` of ``(C, 4, 4)`` matrices."""
    return m.diagonal(dim1=-2, dim2=-1).sum(-1)


def _check_count(count: int, n: Tensor) -> None:
    """Raise unless the global batch (``n``, at least this process's ``count``) has more
    than one value per channel. It is read back (a device sync, and a graph break under
    torch.compile) only when ``count`` cannot decide; processes that read it all see the
    same value, so they raise alike."""
    if count <= 1 and (global_count := int(n.item())) <= 1:
        raise ValueError(
            "QSyncBatchNorm: expected more than 1 value per channel in the global batch "
            f"when using batch statistics, got {global_count}"
        )


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
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, mode, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
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
        # Chosen by the device alone, never by x's shape or layout, so that every process
        # takes the same path (and makes the same collective calls), an empty share included.
        kernels = None
        if self.mode != "split" and not torch.compiler.is_compiling():
            kernels = norm._kernels_for(x.device)
        bad = None  # while tracing: whether the statistics are unusable (no check raised)
        if kernels is None:
            y, mean, stat, n, bad = self._synced(x, group)
        else:
            pdtype, whiten = self._param_dtype(x), self.mode == "whiten"
            weight = (self._gamma_matrix if whiten else self._gamma)(pdtype, x.device)
            beta = self._beta(pdtype, x.device)
            y, mean, stat, n = _SyncFused.apply(x, weight, beta, self.eps, whiten, group, kernels)
        if self.training and self.track_running_stats:  # traced: bad statistics change nothing
            traced_bad = bad if torch.compiler.is_compiling() else None
            self._update_running(mean, stat, n, self._momentum_factor(), traced_bad)
        return y

    def _synced(self, x: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, ...]:
        """``(y, blocked mean, biased statistic, global count, unusable statistic flag)`` in
        differentiable PyTorch ops and collectives (traced whole by torch.compile)."""
        parts = 1 if self.mode == "split" else 4  # components per channel
        channels = self.num_features // parts
        cdt = _compute_dtype(x.dtype)
        with autocast_disabled(x.device.type):
            # (N, parts, C, M), with M given: a process's share of the batch may be empty
            xs = x.to(cdt).reshape(x.shape[0], parts, channels, math.prod(x.shape[2:]))
            # Pass 1: the global count and mean, from sums shifted by this process's first
            # values (near the mean: float32 loses no digits to a large mean).
            count = xs[:, 0, 0].numel()
            shift = xs[:1, :, :, :1].detach() if count else xs.new_zeros(1, parts, channels, 1)
            shifted = xs - shift
            sums = shifted.sum((0, 3)) + count * shift.view(parts, channels)
            total = _all_reduce_sum(torch.cat((sums.reshape(-1), xs.new_full((1,), count))), group)
            n = total[-1]
            _check_count(count, n)
            mean = total[:-1].view(1, parts, channels, 1) / n
            d = shifted - (mean - shift)
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
        out = y.reshape(x.shape).to(x.dtype)
        return out.contiguous(memory_format=_memory_format(x)), mean.reshape(-1), stat, n, bad

    def _normalize(self, d: Tensor, stat: Tensor, cdt: torch.dtype) -> tuple[Tensor, Tensor]:
        """``d`` (centered, ``(N, parts, C, M)``) normalized with the batch statistic
        ``stat`` and scaled by ``weight`` (no shift), and whether ``stat`` is unusable
        (non-finite, or a covariance + eps I that is not positive definite)."""
        bad = torch.isfinite(stat.detach()).all().logical_not()  # not of a sum: no overflow
        if self.mode == "whiten":
            _, m, info = _whitening_map(stat, self._gamma_matrix(cdt, d.device).to(cdt), self.eps)
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
        bias=module.bias is not None,
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
