"""Fused Triton kernels of the quaternion whiten and variance batch norms, for CUDA.

The PyTorch implementation in :mod:`quatnn.nn.norm` launches ~60 small kernels per
whitening forward+backward (~40 in variance mode), and on a GPU those launches, not the
arithmetic, set its pace. Here a forward is 3 launches and a backward 3, reading the
input as ``nn.BatchNorm`` does:

* :func:`_gram_kernel` - per quaternion channel and slab of positions, the sums
  ``sum_i a_i`` and ``sum_i a_i (b_i - center)^T`` (4 and 4x4); the forward takes
  ``a = b = x`` shifted by the channel's first value (so nothing cancels), the backward
  ``a = dy``, ``b = x``, ``center = mu``.
* :func:`_stats_kernel`, :func:`_grad_kernel` - one program that adds up the slabs and
  does every channel's 4x4 algebra in closed form: whitening, mean, covariance, Cholesky
  factor ``L``, ``W = L^-1`` and ``M = Gamma W``; backward, the matrices of
  ``dx = A dy + B (x - mu) + shift`` (the analytic gradient of
  :class:`quatnn.nn.norm._WhitenBatch`) and ``dGamma``. The variance mode's
  ``M = gamma / sqrt(E|x - mu|^2 + eps) I`` takes the other branch of each.
* :func:`_mix_kernel` - ``out = X (x - center) [+ G g] + shift`` per quaternion
  channel; alone, it is the eval-mode forward (:func:`affine`).

The synchronized norm (:mod:`quatnn.nn.sync_norm`) calls the steps one by one, with
all-reduces between them: :func:`moments` and :func:`cross_sums` (sums sweeps),
:func:`maps` and :func:`gradient_maps` (the one-program kernels on the combined sums),
:func:`affine` (map sweeps).

Inputs are ``(N, 4C, *S)`` tensors; contiguous and channels_last ones are taken as they
are (spatial axes on one stride; a tile reads consecutive positions of one channel,
contiguous in memory only in the contiguous layout), others are copied to contiguous
first. Sums and the 4x4 algebra run in float32 (float64 for float64 inputs). The kernels
run in Triton's interpreter on CPU tensors too (``TRITON_INTERPRET=1``), which is how the
tests check them.

Example (:class:`quatnn.nn.QBatchNorm2d` calls these by itself on CUDA; CPU tensors need
``TRITON_INTERPRET=1`` set before Triton is imported):
    >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
    >>> x = torch.randn(8, 16, 5, 5, device=dev)
    >>> gm, beta = torch.eye(4, device=dev).repeat(4, 1, 1) / 2, torch.zeros(16, device=dev)
    >>> y, mu, cov, saved, bad = whiten_forward(x, gm, beta, 1e-5)
    >>> y.shape, mu.shape, cov.shape, int(bad)
    (torch.Size([8, 16, 5, 5]), torch.Size([4, 4]), torch.Size([4, 4, 4]), 0)
"""

from __future__ import annotations

import contextlib
import functools
import itertools

import torch
import triton
import triton.language as tl
from torch import Tensor

from quatnn.nn.norm import _count

# Positions per tile of the sweeps (each program walks its slab tile by tile).
_BLOCK = 128
# Channels per step of the single-program 4x4 algebra (at most), and partial-sum rows it
# loads a step (channels x slabs).
_CHANNELS = 32
_ROWS = 128
# Programs per streaming multiprocessor the sweeps aim for (slabs = this x SMs / C).
_WAVES = 4
# Values per partial-sum row: 16 cross sums then 4 plain sums.
_PART = tl.constexpr(20)


@triton.jit
def _tile_offsets(p, s_total, c, n_channels, s_n, s_c, s_s):
    """Offsets ``[4, BLOCK]`` of the 4 components of channel ``c`` at flat positions ``p``
    (``p = n * S + s``), for a tensor with strides ``s_n`` (sample), ``s_c`` (real
    channel), ``s_s`` (flattened spatial)."""
    n = (p // s_total).to(tl.int64)
    s = (p % s_total).to(tl.int64)
    comp = tl.arange(0, 4)
    chan = (comp * n_channels + c).to(tl.int64)
    return n[None, :] * s_n + chan[:, None] * s_c + s[None, :] * s_s


@triton.jit
def _gram_kernel(
    a_ptr, b_ptr, center_ptr, part_ptr,
    n_channels, s_total, positions, per_slab, slabs,
    a_n, a_c, a_s, b_n, b_c, b_s,
    SAME: tl.constexpr, FIRST_CENTER: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Partial sums of channel ``program_id(0)`` over slab ``program_id(1)``:
    ``part[c, slab] = [sum a (b - center)^T (16, row-major), sum a (4)]``. ``SAME``: ``a``
    is ``b - center`` (``a_ptr`` unused); ``FIRST_CENTER``: the center is the channel's
    value at position 0 (``center_ptr`` unused), else blocked ``(4C,)`` at ``center_ptr``."""
    c = tl.program_id(0)
    slab = tl.program_id(1)
    acc_t = part_ptr.dtype.element_ty
    comp = tl.arange(0, 4)
    if FIRST_CENTER:
        center = tl.load(b_ptr + (comp * n_channels + c).to(tl.int64) * b_c).to(acc_t)
    else:
        center = tl.load(center_ptr + comp * n_channels + c).to(acc_t)
    cross = tl.zeros((4, 4, BLOCK), dtype=acc_t)
    plain = tl.zeros((4, BLOCK), dtype=acc_t)
    start = slab * per_slab
    stop = tl.minimum(start + per_slab, positions)
    for p0 in range(start, stop, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        inside = (p < stop)[None, :]
        offs = _tile_offsets(p, s_total, c, n_channels, b_n, b_c, b_s)
        d = tl.load(b_ptr + offs, mask=inside, other=0.0).to(acc_t) - center[:, None]
        d = tl.where(inside, d, 0.0)
        if SAME:
            a = d
        else:
            offs = _tile_offsets(p, s_total, c, n_channels, a_n, a_c, a_s)
            a = tl.load(a_ptr + offs, mask=inside, other=0.0).to(acc_t)
        cross += a[:, None, :] * d[None, :, :]
        plain += a
    row = part_ptr + (c * slabs + slab) * _PART
    tl.store(row + comp[:, None] * 4 + comp[None, :], tl.sum(cross, 2))
    tl.store(row + 16 + comp, tl.sum(plain, 1))


@triton.jit
def _mix_kernel(
    x_ptr, g_ptr, out_ptr, mat_x_ptr, mat_g_ptr, center_ptr, shift_ptr,
    n_channels, s_total, positions, per_slab,
    x_n, x_c, x_s, g_n, g_c, g_s, o_n, o_c, o_s,
    GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``out = X (x - center) [+ G g] + shift`` for channel ``program_id(0)`` over slab
    ``program_id(1)``; ``X``, ``G`` are ``(C, 4, 4)`` row-major, ``center`` and ``shift``
    blocked ``(4C,)``. Centering first keeps the precision of ``x - center`` (folded into
    the shift, ``X x`` and ``X center`` would cancel where the mean dwarfs the spread)."""
    c = tl.program_id(0)
    slab = tl.program_id(1)
    acc_t = mat_x_ptr.dtype.element_ty
    comp = tl.arange(0, 4)
    square = c * 16 + comp[:, None] * 4 + comp[None, :]
    mat_x = tl.load(mat_x_ptr + square)
    if GRAD:
        mat_g = tl.load(mat_g_ptr + square)
    center = tl.load(center_ptr + comp * n_channels + c)
    shift = tl.load(shift_ptr + comp * n_channels + c)
    start = slab * per_slab
    stop = tl.minimum(start + per_slab, positions)
    for p0 in range(start, stop, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        inside = (p < stop)[None, :]
        src = tl.load(
            x_ptr + _tile_offsets(p, s_total, c, n_channels, x_n, x_c, x_s), mask=inside
        ).to(acc_t)
        res = tl.sum(mat_x[:, :, None] * (src - center[:, None])[None, :, :], 1) + shift[:, None]
        if GRAD:
            src = tl.load(
                g_ptr + _tile_offsets(p, s_total, c, n_channels, g_n, g_c, g_s), mask=inside
            ).to(acc_t)
            res += tl.sum(mat_g[:, :, None] * src[None, :, :], 1)
        offs = _tile_offsets(p, s_total, c, n_channels, o_n, o_c, o_s)
        tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _bmm4(a, b):
    """Per-channel product of ``[K, 4, 4]`` tiles."""
    return tl.sum(a[:, :, :, None] * b[:, None, :, :], 2)


@triton.jit
def _mT(a):
    """Per-channel transpose of a ``[K, 4, 4]`` tile."""
    return tl.permute(a, (0, 2, 1))


@triton.jit
def _entry(a, rows, cols, i: tl.constexpr, j: tl.constexpr):
    """Entry ``(i, j)`` of each channel's matrix in a ``[K, 4, 4]`` tile: ``[K]``."""
    return tl.sum(tl.sum(tl.where((rows == i) & (cols == j), a, 0.0), 2), 1)


@triton.jit
def _put(v, rows, cols, i: tl.constexpr, j: tl.constexpr):
    """A ``[K, 4, 4]`` tile holding ``v`` (``[K]``) at ``(i, j)`` and zeros elsewhere."""
    return tl.where((rows == i) & (cols == j), v[:, None, None], 0.0)


@triton.jit
def _inverse_cholesky(v, rows, cols):
    """``W = L^-1`` for ``V = L L^T`` (``L`` lower triangular, positive diagonal), per
    channel of a ``[K, 4, 4]`` tile, in closed form. A ``V`` that is not positive definite
    gives NaN or Inf entries."""
    l00 = tl.sqrt(_entry(v, rows, cols, 0, 0))
    l10 = _entry(v, rows, cols, 1, 0) / l00
    l20 = _entry(v, rows, cols, 2, 0) / l00
    l30 = _entry(v, rows, cols, 3, 0) / l00
    l11 = tl.sqrt(_entry(v, rows, cols, 1, 1) - l10 * l10)
    l21 = (_entry(v, rows, cols, 2, 1) - l20 * l10) / l11
    l31 = (_entry(v, rows, cols, 3, 1) - l30 * l10) / l11
    l22 = tl.sqrt(_entry(v, rows, cols, 2, 2) - l20 * l20 - l21 * l21)
    l32 = (_entry(v, rows, cols, 3, 2) - l30 * l20 - l31 * l21) / l22
    l33 = tl.sqrt(_entry(v, rows, cols, 3, 3) - l30 * l30 - l31 * l31 - l32 * l32)
    # forward substitution of W L = I: w_ii = 1/l_ii, w_ij = -(sum_k l_ik w_kj) / l_ii
    w00 = 1.0 / l00
    w11 = 1.0 / l11
    w22 = 1.0 / l22
    w33 = 1.0 / l33
    w10 = -l10 * w00 * w11
    w21 = -l21 * w11 * w22
    w32 = -l32 * w22 * w33
    w20 = -(l20 * w00 + l21 * w10) * w22
    w31 = -(l31 * w11 + l32 * w21) * w33
    w30 = -(l30 * w00 + l31 * w10 + l32 * w20) * w33
    w = _put(w00, rows, cols, 0, 0) + _put(w11, rows, cols, 1, 1)
    w += _put(w22, rows, cols, 2, 2) + _put(w33, rows, cols, 3, 3)
    w += _put(w10, rows, cols, 1, 0) + _put(w21, rows, cols, 2, 1)
    w += _put(w32, rows, cols, 3, 2) + _put(w20, rows, cols, 2, 0)
    w += _put(w31, rows, cols, 3, 1) + _put(w30, rows, cols, 3, 0)
    return w


@triton.jit
def _slab_sums(part_ptr, ch, inside, slabs, CHANNELS: tl.constexpr, SLABS: tl.constexpr):
    """Sum over slabs of the partial rows of channels ``ch`` (``CHANNELS`` of them), ``SLABS``
    slabs a step (one load of many rows, not a chain of dependent loads a slab):
    ``[K, 4, 4]``, ``[K, 4]``."""
    acc_t = part_ptr.dtype.element_ty
    comp = tl.arange(0, 4)
    rows = comp[None, None, :, None]
    cols = comp[None, None, None, :]
    cross = tl.zeros((CHANNELS, 4, 4), dtype=acc_t)
    plain = tl.zeros((CHANNELS, 4), dtype=acc_t)
    base = ch.to(tl.int64) * slabs * _PART
    for s0 in range(0, slabs, SLABS):
        slab = s0 + tl.arange(0, SLABS)
        taken = inside[:, None] & (slab < slabs)[None, :]  # [K, SLABS]
        row = part_ptr + base[:, None] + slab[None, :] * _PART
        tile = tl.load(row[:, :, None, None] + rows * 4 + cols, taken[:, :, None, None], 0.0)
        cross += tl.sum(tile, 1)
        plain += tl.sum(tl.load(row[:, :, None] + 16 + comp, taken[:, :, None], 0.0), 1)
    return cross, plain


@triton.jit
def _moments(
    part_ptr, x_ptr, ch, inside, blocked, slabs, x_c, count,
    CHANNELS: tl.constexpr, SLABS: tl.constexpr,
):  # fmt: skip
    """Mean ``[K, 4]`` and biased covariance ``[K, 4, 4]`` of channels ``ch`` from the
    slabs' sums of :func:`_gram_kernel`, shifted by each channel's first value in ``x``."""
    cross, plain = _slab_sums(part_ptr, ch, inside, slabs, CHANNELS, SLABS)
    first = tl.load(x_ptr + blocked.to(tl.int64) * x_c, mask=inside[:, None], other=0.0)
    delta = plain / count
    mu = first.to(part_ptr.dtype.element_ty) + delta
    return mu, cross / count - delta[:, :, None] * delta[:, None, :]


@triton.jit
def _stats_kernel(
    part_ptr, x_ptr, weight_ptr, mu_ptr, stat_ptr, inv_ptr, mm_ptr, bad_ptr,
    n_channels, slabs, x_c, count, eps,
    WHITEN: tl.constexpr, CHANNELS: tl.constexpr, SLABS: tl.constexpr,
):  # fmt: skip
    """Forward statistics and map of every channel (one program) from the sums sweep: the
    blocked mean ``mu`` and ``M`` (``(C, 4, 4)``); with ``WHITEN`` the covariance (biased,
    without eps) in ``stat`` and ``W = L^-1`` in ``inv`` (``(C, 4, 4)``), ``M = Gamma W``;
    else ``sigma2 = E|x - mu|^2`` in ``stat`` and ``1/sqrt(sigma2 + eps)`` in ``inv``
    (``(C,)``), ``M = gamma inv I``. ``bad[0] = 1`` where a statistic is NaN/Inf (or the
    covariance is not positive definite)."""
    comp = tl.arange(0, 4)
    rows = comp[None, :, None]
    cols = comp[None, None, :]
    eye = tl.where(rows == cols, 1.0, 0.0)
    bad = tl.zeros((CHANNELS,), dtype=tl.int32)
    for c0 in range(0, n_channels, CHANNELS):
        ch = c0 + tl.arange(0, CHANNELS)
        inside = ch < n_channels
        in3 = inside[:, None, None]
        blocked = comp[None, :] * n_channels + ch[:, None]  # [K, 4] blocked index
        square = ch[:, None, None] * 16 + rows * 4 + cols  # [K, 4, 4] row-major index
        mu, cov = _moments(part_ptr, x_ptr, ch, inside, blocked, slabs, x_c, count, CHANNELS, SLABS)
        if WHITEN:
            w = _inverse_cholesky(cov + eps * eye, rows, cols)
            mm = _bmm4(tl.load(weight_ptr + square, mask=in3, other=0.0), w)
            nonfinite = (w * 0.0 != 0.0) | (cov * 0.0 != 0.0)
            bad = tl.maximum(bad, tl.max(tl.max(tl.where(nonfinite, 1, 0), 2), 1))
            tl.store(stat_ptr + square, cov, mask=in3)
            tl.store(inv_ptr + square, w, mask=in3)
        else:
            sigma2 = tl.sum(tl.sum(tl.where(rows == cols, cov, 0.0), 2), 1)
            inv = 1.0 / tl.sqrt(sigma2 + eps)
            mm = eye * (tl.load(weight_ptr + ch, mask=inside, other=0.0) * inv)[:, None, None]
            bad = tl.maximum(bad, tl.where(inside & (sigma2 * 0.0 != 0.0), 1, 0))
            tl.store(stat_ptr + ch, sigma2, mask=inside)
            tl.store(inv_ptr + ch, inv, mask=inside)
        tl.store(mu_ptr + blocked, mu, mask=inside[:, None])
        tl.store(mm_ptr + square, mm, mask=in3)
    tl.store(bad_ptr, tl.max(bad, 0))


@triton.jit
def _grad_kernel(
    part_ptr, inv_ptr, weight_ptr, mm_ptr,
    mat_a_ptr, mat_b_ptr, shift_ptr, dweight_ptr, dbeta_ptr,
    n_channels, slabs, count,
    WHITEN: tl.constexpr, CHANNELS: tl.constexpr, SLABS: tl.constexpr,
):  # fmt: skip
    """Backward matrices of every channel (one program), from ``P = sum dy (x - mu)^T`` and
    ``sum dy``: ``dx = A dy + B (x - mu) + shift`` with ``A = M^T`` and
    ``shift = -(1/n) M^T sum dy``; ``dbeta = sum dy`` (blocked). Whitening (``inv`` is
    ``W``, ``weight`` is ``Gamma``, ``M`` read from ``mm``): ``B = -(2/n) W^T
    sym(Gamma^T P W^T) W`` (``sym(X) = (tril X + tril(X, -1)^T) / 2``, the Cholesky
    factor's adjoint), ``dGamma = P W^T``. Variance (``inv``, ``gamma``; ``mm`` unread):
    ``M = gamma inv I``, ``B = -gamma inv^3 tr(P) / n I``, ``dgamma = inv tr(P)``."""
    comp = tl.arange(0, 4)
    rows = comp[None, :, None]
    cols = comp[None, None, :]
    eye = tl.where(rows == cols, 1.0, 0.0)
    for c0 in range(0, n_channels, CHANNELS):
        ch = c0 + tl.arange(0, CHANNELS)
        inside = ch < n_channels
        in3 = inside[:, None, None]
        blocked = comp[None, :] * n_channels + ch[:, None]
        square = ch[:, None, None] * 16 + rows * 4 + cols
        cross, dbeta = _slab_sums(part_ptr, ch, inside, slabs, CHANNELS, SLABS)
        if WHITEN:
            w = tl.load(inv_ptr + square, mask=in3, other=0.0)
            gm = tl.load(weight_ptr + square, mask=in3, other=0.0)
            mat_a = _mT(tl.load(mm_ptr + square, mask=in3, other=0.0))
            lower = tl.where(rows >= cols, _bmm4(_bmm4(_mT(gm), cross), _mT(w)), 0.0)
            sym = 0.5 * (lower + _mT(tl.where(rows > cols, lower, 0.0)))
            mat_b = _bmm4(_bmm4(_mT(w), sym), w) * -2.0 / count  # count last: float64 stays
            tl.store(dweight_ptr + square, _bmm4(cross, _mT(w)), mask=in3)
        else:
            q = tl.sum(tl.sum(tl.where(rows == cols, cross, 0.0), 2), 1)
            inv = tl.load(inv_ptr + ch, mask=inside, other=0.0)
            scale = tl.load(weight_ptr + ch, mask=inside, other=0.0) * inv
            mat_a = eye * scale[:, None, None]
            mat_b = eye * (-scale * inv * inv * q / count)[:, None, None]
            tl.store(dweight_ptr + ch, q * inv, mask=inside)
        shift = -(tl.sum(mat_a * dbeta[:, None, :], 2) / count)
        tl.store(mat_a_ptr + square, mat_a, mask=in3)
        tl.store(mat_b_ptr + square, mat_b, mask=in3)
        tl.store(shift_ptr + blocked, shift, mask=inside[:, None])
        tl.store(dbeta_ptr + blocked, dbeta, mask=inside[:, None])


def _spatial_stride(t: Tensor) -> int | None:
    """The one stride of the spatial axes of ``(N, 4C, *S)`` flattened, or None where they
    do not flatten to one (from shape and strides alone: no dispatcher call)."""
    axes = [(n, st) for n, st in zip(t.shape[2:], t.stride()[2:], strict=True) if n != 1]
    for (_, outer), (n, inner) in itertools.pairwise(axes):
        if outer != n * inner:
            return None
    return axes[-1][1] if axes else 1


def _strides(t: Tensor) -> tuple[int, int, int]:
    """Strides of ``t`` viewed as ``(N, 4C, S)``: sample, real channel, position."""
    spatial = _spatial_stride(t)
    assert spatial is not None
    return t.stride(0), t.stride(1), spatial


@functools.cache
def _capable(device: torch.device) -> bool:
    """Whether Triton compiles for ``device``: a CUDA GPU of compute capability 7.0 or newer
    (as Inductor requires), a ROCm GPU, or the interpreter's CPU."""
    if device.type != "cuda" or torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device) >= (7, 0)


def taken(t: Tensor) -> Tensor:
    """``t`` in a layout the kernels take: itself, or a contiguous copy where its spatial
    axes do not flatten to one stride."""
    return t if _spatial_stride(t) is not None else t.contiguous()


def supports(x: Tensor) -> bool:
    """Whether the kernels take ``x`` as it is: not empty, spatial axes on one stride, on a
    device Triton compiles for."""
    return x.numel() > 0 and _spatial_stride(x) is not None and _capable(x.device)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (2 elsewhere: the interpreter)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _sweep(x: Tensor, c: int) -> tuple[int, int, int, int]:
    """``(S, positions N*S, positions per slab, slabs)`` of a sweep over ``x`` with ``C``
    channels: slabs of whole tiles, enough programs for a few waves over the device's SMs."""
    s_total = _count(x) // x.shape[0]
    positions = x.shape[0] * s_total
    wanted = triton.cdiv(_WAVES * _multiprocessors(x.device), c)
    slabs = max(1, min(triton.cdiv(positions, _BLOCK), wanted))
    per_slab = triton.cdiv(triton.cdiv(positions, slabs), _BLOCK) * _BLOCK
    return s_total, positions, per_slab, triton.cdiv(positions, per_slab)


def _gram(
    a: Tensor | None, b: Tensor, center: Tensor | None, c: int, dtype: torch.dtype
) -> tuple[Tensor, int]:
    """Partial sums ``(C, slabs, 20)`` of :func:`_gram_kernel` and the slab count."""
    s_total, positions, per_slab, slabs = _sweep(b, c)
    part = torch.empty(c, slabs, _PART.value, dtype=dtype, device=b.device)
    a_strides = _strides(b if a is None else a)
    _gram_kernel[(c, slabs)](
        b if a is None else a, b, b if center is None else center, part,
        c, s_total, positions, per_slab, slabs, *a_strides, *_strides(b),
        SAME=a is None, FIRST_CENTER=center is None, BLOCK=_BLOCK,
    )  # fmt: skip
    return part, slabs


def _mix(
    out: Tensor, mat_x: Tensor, x: Tensor, center: Tensor, shift: Tensor,
    mat_g: Tensor | None = None, g: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``out = X (x - center) [+ G g] + shift`` per channel (:func:`_mix_kernel`)."""
    c = mat_x.shape[0]
    s_total, positions, per_slab, slabs = _sweep(x, c)
    grad = mat_g is not None
    _mix_kernel[(c, slabs)](
        x, g if grad else x, out, mat_x, mat_g if grad else mat_x, center, shift,
        c, s_total, positions, per_slab,
        *_strides(x), *_strides(g if grad else x), *_strides(out),
        GRAD=grad, BLOCK=_BLOCK,
    )  # fmt: skip
    return out


def _on_device_of(x: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it ``x``'s."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _one_program(c: int) -> dict[str, int]:
    """Block sizes of the one-program kernels for ``C`` channels: ``CHANNELS`` a step (a
    power of 2 up to :data:`_CHANNELS`) and as many slabs as fill :data:`_ROWS` rows."""
    channels = min(_CHANNELS, triton.next_power_of_2(c))
    return {"CHANNELS": channels, "SLABS": _ROWS // channels}


def _forward(
    whiten: bool, x: Tensor, weight: Tensor, beta: Tensor, eps: float,
    stats: tuple[Tensor, Tensor, Tensor],
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """A training-mode forward: the sums sweep, :func:`_stats_kernel` (writing ``stats``:
    the blocked mean, the statistic, its inverse; and the map ``M``) and the map sweep
    ``y = M (x - mu) + beta``: ``(y, M, bad)``."""
    c, x = beta.shape[0] // 4, taken(x)
    mm = beta.new_empty(c, 4, 4)
    bad = torch.empty(1, dtype=torch.int32, device=x.device)
    with _on_device_of(x):
        part, slabs = _gram(None, x, None, c, beta.dtype)
        _stats_kernel[(1,)](
            part, x, weight.contiguous(), *stats, mm, bad,
            c, slabs, _strides(x)[1], _count(x), eps, WHITEN=whiten, **_one_program(c),
        )  # fmt: skip
        y = _mix(torch.empty_like(x), mm, x, stats[0], beta.contiguous())
    return y, mm, bad


def _backward(
    whiten: bool, x: Tensor, dy: Tensor, mu: Tensor, saved: tuple[Tensor, Tensor, Tensor],
    grads: tuple[Tensor, Tensor],
) -> Tensor:  # fmt: skip
    """A training-mode backward: the cross-sums sweep of ``dy`` and ``x - mu``,
    :func:`_grad_kernel` (the matrices of ``dx = A dy + B (x - mu) + shift`` from ``saved``
    (inverse statistic, weight, ``M``), and the parameter ``grads``) and the map sweep:
    ``dx``."""
    c, x, dy = mu.shape[0] // 4, taken(x), taken(dy)
    new = mu.new_empty
    mat_a, mat_b, shift = new(c, 4, 4), new(c, 4, 4), new(4 * c)
    with _on_device_of(x):
        part, slabs = _gram(dy, x, mu, c, mu.dtype)
        _grad_kernel[(1,)](
            part, *saved, mat_a, mat_b, shift, *grads,
            c, slabs, _count(x), WHITEN=whiten, **_one_program(c),
        )  # fmt: skip
        return _mix(torch.empty_like(x), mat_b, x, mu, shift, mat_a, dy)


def whiten_forward(
    x: Tensor, gm: Tensor, beta: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor], Tensor]:
    """Training-mode whitening of ``x`` (``(N, 4C, *S)``, :func:`supports`) with ``gm``
    ``(C, 4, 4)`` and blocked ``beta`` ``(4C,)`` in the compute dtype: ``(y, mu (C, 4),
    cov (C, 4, 4) biased, (mu blocked, W, M) for :func:`whiten_backward`, bad)`` where
    ``bad`` is a one-element int32 flag of non-finite or indefinite statistics."""
    c = gm.shape[0]
    mu, cov, w = gm.new_empty(4 * c), gm.new_empty(c, 4, 4), gm.new_empty(c, 4, 4)
    y, mm, bad = _forward(True, x, gm, beta, eps, (mu, cov, w))
    return y, mu.view(4, c).t(), cov, (mu, w, mm), bad


def whiten_backward(
    x: Tensor, dy: Tensor, saved: tuple[Tensor, Tensor, Tensor], gm: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dx, dGamma (C, 4, 4), dbeta blocked (4C,))`` of :func:`whiten_forward`
    for the output gradient ``dy``; ``saved`` is its ``(mu, W, M)``."""
    mu, w, mm = saved
    dgm, dbeta = torch.empty_like(mm), torch.empty_like(mu)
    dx = _backward(True, x, dy, mu, (w, gm.contiguous(), mm), (dgm, dbeta))
    return dx, dgm, dbeta


def affine(
    x: Tensor, mm: Tensor, center: Tensor, shift: Tensor,
    mat_g: Tensor | None = None, g: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """``y = M (x - center) [+ G g] + shift`` per channel in one launch (the eval-mode
    whitening; with ``G g``, the input gradient of a training pass): ``mm`` and ``mat_g``
    ``(C, 4, 4)``, blocked ``center`` and ``shift`` ``(4C,)`` in the compute dtype, ``g``
    shaped as ``x``."""
    x = taken(x)
    if mat_g is not None:
        mat_g, g = mat_g.contiguous(), taken(g)
    with _on_device_of(x):
        out = torch.empty_like(x)
        return _mix(out, mm.contiguous(), x, center.contiguous(), shift.contiguous(), mat_g, g)


def variance_forward(
    x: Tensor, gamma: Tensor, beta: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode variance normalization of ``x`` with ``gamma`` ``(C,)`` and blocked
    ``beta`` in the compute dtype: ``(y, mu (4C,) blocked, sigma2 (C,) biased, inv =
    1/sqrt(sigma2 + eps), bad)`` (``bad`` as in :func:`whiten_forward`)."""
    mu, sigma2, inv = torch.empty_like(beta), torch.empty_like(gamma), torch.empty_like(gamma)
    y, _, bad = _forward(False, x, gamma, beta, eps, (mu, sigma2, inv))
    return y, mu, sigma2, inv, bad


def variance_backward(
    x: Tensor, dy: Tensor, mu: Tensor, inv: Tensor, gamma: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dx, dgamma (C,), dbeta blocked (4C,))`` of :func:`variance_forward` for
    the output gradient ``dy``, from its ``mu`` and ``inv``."""
    dgamma, dbeta = torch.empty_like(gamma), torch.empty_like(mu)
    saved = (inv, gamma.contiguous(), inv)  # the kernel reads no M in variance mode
    dx = _backward(False, x, dy, mu, saved, (dgamma, dbeta))
    return dx, dgamma, dbeta


def moments(x: Tensor, c: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per quaternion channel of ``x`` (``(N, 4C, *S)``, not empty) in ``dtype``: the mean
    ``(C, 4)`` and the sum of centred outer products ``sum_i (x_i - mu)(x_i - mu)^T``
    ``(C, 4, 4)``, from one sums sweep (shifted by each channel's first value, so nothing
    cancels): what processes combine into the statistics of their joint batch."""
    x = taken(x)
    with _on_device_of(x):
        part, _ = _gram(None, x, None, c, dtype)
    sums = part.sum(1)
    cross, plain = sums[:, :16].view(c, 4, 4), sums[:, 16:]
    first = x[(0, slice(None), *(0,) * (x.dim() - 2))].view(4, c).t()
    delta = plain / _count(x)
    return first + delta, cross - plain.unsqueeze(-1) * delta.unsqueeze(-2)


def cross_sums(dy: Tensor, x: Tensor, mu: Tensor) -> Tensor:
    """Rows ``(C, 20)``: per quaternion channel ``sum_i dy_i (x_i - mu)^T`` (16, row-major)
    then ``sum_i dy_i`` (4), in ``mu``'s dtype, for a blocked ``mu`` ``(4C,)`` and ``dy``,
    ``x`` ``(N, 4C, *S)``, not empty: the sums an input gradient is made of."""
    c, x, dy = mu.shape[0] // 4, taken(x), taken(dy)
    with _on_device_of(x):
        part, _ = _gram(dy, x, mu.contiguous(), c, mu.dtype)
    return part.sum(1)


def maps(
    whiten: bool, mu: Tensor, cov: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_stats_kernel` on given statistics (one launch): from a blocked mean ``mu``
    ``(4C,)`` and a biased covariance ``cov`` ``(C, 4, 4)`` (handed to it as one slab of
    centred sums over one value), ``(statistic, inverse, M, bad)`` as in
    :func:`whiten_forward` / :func:`variance_forward` (``weight`` is ``Gamma`` or
    ``gamma``)."""
    c, whole, mu = mu.shape[0] // 4, (mu.shape[0] // 4, 4, 4), mu.contiguous()
    part = torch.cat((cov.reshape(c, 16), cov.new_zeros(c, 4)), 1)
    stat, inv = (cov.new_empty(whole), cov.new_empty(whole)) if whiten else cov.new_empty(2, c)
    mm, bad = cov.new_empty(whole), torch.empty(1, dtype=torch.int32, device=mu.device)
    with _on_device_of(mu):
        _stats_kernel[(1,)](
            part, mu, weight.contiguous(), torch.empty_like(mu), stat, inv, mm, bad,
            c, 1, 1, 1, eps, WHITEN=whiten, **_one_program(c),
        )  # fmt: skip
    return stat, inv, mm, bad


def gradient_maps(
    whiten: bool, means: Tensor, saved: tuple[Tensor, Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_grad_kernel` on given sums (one launch): from rows ``(C, 20)`` of
    :func:`cross_sums` divided by the count, the matrices ``(A, B, shift blocked)`` of
    ``dx = A dy + B (x - mu) + shift``; ``saved`` is ``(inverse, weight, M)`` of
    :func:`maps`."""
    c = means.shape[0]
    new = means.new_empty
    mat_a, mat_b, shift = new(c, 4, 4), new(c, 4, 4), new(4 * c)
    unused = (new(c, 4, 4) if whiten else new(c), new(4 * c))  # parameter gradients
    with _on_device_of(means):
        _grad_kernel[(1,)](
            means.contiguous(), *(t.contiguous() for t in saved), mat_a, mat_b, shift, *unused,
            c, 1, 1, WHITEN=whiten, **_one_program(c),
        )  # fmt: skip
    return mat_a, mat_b, shift
