"""Fast quaternion linear maps and convolutions, and the choice between two algorithms.

Both compute ``y_o = sum_i W_oi (x) x_i + b_o`` (left Hamilton product, DESIGN.md) on
component-blocked tensors:

* ``"block"``: fold ``W`` into the 16-block real matrix (:func:`block_weight`) and run one
  real GEMM/convolution. Few kernels, so it wins on small layers and under autocast.
* ``"rank8"``: quaternion multiplication has bilinear rank 8 (Howell & Lafon 1975), so the
  quaternion product is formed from 8 real products of quaternion size on pre-added
  (Hadamard) combinations of weight and input, then post-added: half the multiply-adds of
  the real layer of the same width. Its backward is again two rank-8 quaternion products
  (``dx = W^H (x) dy``, ``dW = dy (x) conj(x)``), so no 16-block matrix is ever formed.
  It computes in the promoted dtype of its inputs with autocast off (the pre-added
  combinations lose bits in 16-bit floats).
* ``"auto"`` (default): block under autocast or for half-precision inputs, otherwise rank8
  when one of the 8 real products is large enough to amortize the extra element-wise
  passes (:func:`resolve_algorithm` documents the rule), else block.

Example:
    >>> import torch
    >>> from quatnn import functional as QF
    >>> x, w = torch.randn(2, 8), torch.randn(4, 3, 2)
    >>> y = QF.quaternion_linear(x, w, algorithm="rank8")
    >>> torch.allclose(y, QF.quaternion_linear(x, w, algorithm="block"), atol=1e-5)
    True
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ALGORITHMS",
    "autocast_disabled",
    "quaternion_linear",
    "quaternion_conv",
    "block_weight",
    "resolve_algorithm",
    "use_algorithm",
    "same_padding",
    "transforming",
]

ALGORITHMS = ("auto", "block", "rank8")

# When "auto" picks rank8, per device type and kind of layer: any of the options (least
# multiply-adds in ONE of the 8 real products, least quaternion channels per group on either
# side of it, only while gradients are recorded). Measured with `quatnn bench layers` and
# sweeps of convolution sizes and of linear widths 512-2048 at batches 64-1024 on 2 CPU
# threads (README): smaller products lose more to the extra element-wise passes and kernel
# calls than the halved arithmetic saves (a linear layer of 128 quaternions lost or tied at
# every batch, one of 160 won or tied), and oneDNN runs narrow convolutions less
# efficiently (at 16 quaternion channels only the backward gains enough). On CUDA (H200,
# before the chunked convolution) rank8 lost at every benchmarked size (2.5x-7x the real
# layer, block 1.2x-2.3x), so there is no CUDA rule.
RANK8_RULES = {
    "cpu": {
        "linear": ((2**21, 160, False),),
        "conv": ((2**25, 32, False), (2**27, 16, True)),
    }
}

_override: str | None = None


@contextlib.contextmanager
def use_algorithm(name: str | None) -> Iterator[None]:
    """Force one algorithm for every quaternion layer inside the block (for benchmarks).

    >>> with use_algorithm("block"):
    ...     pass
    """
    global _override
    if name is not None and name not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {name!r}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def transforming() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jacrev, ...) is running: the
    custom autograd Functions of the layers do not run under them.

    >>> transforming()
    False
    """
    return getattr(torch._C, "_are_functorch_transforms_active", lambda: False)()


def _autocasting(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (never on devices without it: meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def resolve_algorithm(
    algorithm: str, x: Tensor, macs_per_product: int, channels: int, kind: str = "linear"
) -> str:
    """The algorithm a call will use: the :func:`use_algorithm` override if set, else
    ``algorithm`` unless it is ``"auto"``. ``"auto"`` picks ``"block"`` under autocast, for
    16-bit inputs, while ``torch.export`` traces (so that an exported graph has no branch
    on the batch size and keeps it dynamic) and under ``torch.func`` transforms (vmap,
    grad, ...: the rank-8 Functions do not support them); ``"rank8"`` where an option of
    :data:`RANK8_RULES` says it wins (one real product has at least that many multiply-adds,
    ``channels`` = the fewer quaternion channels per group of input and output reaches the
    minimum, gradients are recorded if the option needs them); ``"block"`` otherwise.
    ``kind`` is ``"linear"`` or ``"conv"``."""
    chosen = _override if _override not in (None, "auto") else algorithm
    if chosen not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {chosen!r}")
    if chosen != "auto":
        return chosen
    device = x.device.type
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()  # torch >= 2.5
    if (
        exporting
        or _autocasting(device)
        or transforming()
        or x.dtype in (torch.float16, torch.bfloat16)
    ):
        return "block"
    grad = torch.is_grad_enabled()
    for min_macs, min_channels, needs_grad in RANK8_RULES.get(device, {}).get(kind, ()):
        if macs_per_product >= min_macs and channels >= min_channels and (grad or not needs_grad):
            return "rank8"
    return "block"


# --------------------------------------------------------------------------- block fold

# L(a) = [[a0,-a1,-a2,-a3],[a1,a0,-a3,a2],[a2,a3,a0,-a1],[a3,-a2,a1,a0]] (DESIGN.md)
_BLOCK_INDEX = ((0, 1, 2, 3), (1, 0, 3, 2), (2, 3, 0, 1), (3, 2, 1, 0))
_BLOCK_SIGN = ((1, -1, -1, -1), (1, 1, -1, 1), (1, 1, 1, -1), (1, -1, 1, 1))


def _constant_cache(fn: Callable[..., object]) -> Callable[..., object]:
    """``functools.cache`` for the small constant tensors below (one entry per layer shape,
    dtype and device in use: a bounded cache would rebuild them on every call of a model
    with more shapes than its size), bypassed while torch.compile or torch.export traces:
    the cache would keep the fake tensors of the trace and hand them to later eager calls."""
    cached = functools.cache(fn)

    @functools.wraps(fn)
    def get(*args: object) -> object:
        return fn(*args) if torch.compiler.is_compiling() else cached(*args)

    get.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return get


@_constant_cache
def _fold_plan(
    rows: int, groups: int, transposed: bool, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The gather of :func:`block_weight` for a weight of ``(4, rows, ...)`` with its rows
    flattened to ``(4 rows, n)``: row ``r`` of the folded weight, as ``(16 rows, n)``, is
    weight row ``index[r]`` times ``sign[r]``. Built in plain Python, so that a trace
    (torch.export, ONNX) holds them as constants."""
    per_group, index, sign = rows // groups, [], []
    for g, outer, r, inner in itertools.product(
        range(groups), range(4), range(per_group), range(4)
    ):
        c_out, c_in = (inner, outer) if transposed else (outer, inner)
        index.append(_BLOCK_INDEX[c_out][c_in] * rows + g * per_group + r)
        sign.append(_BLOCK_SIGN[c_out][c_in])
    return (
        torch.tensor(index, device=device),
        torch.tensor(sign, dtype=dtype, device=device).view(-1, 1),
    )


def block_weight(weight: Tensor, groups: int = 1, transposed: bool = False) -> Tensor:
    """Fold a quaternion weight into the real weight of the equivalent real layer.

    ``weight`` is ``(4, O, I/g, *k)`` (``(4, I, O/g, *k)`` if ``transposed``). The result
    is the ``torch.nn`` weight of the real layer, ``(4O, 4I/g, *k)`` (``(4I, 4O/g, *k)``).
    With ``groups == 1`` real channels are in the blocked layout. With ``groups > 1`` they
    are group-major ``(group, component, channel)``, so the real grouped layer must see its
    input and output channels permuted (:func:`quaternion_conv` does that). Each row of
    the result is a signed copy of a row of ``weight``: one gather and one multiply, and
    their backward is as cheap.

    >>> block_weight(torch.randn(4, 3, 2, 5)).shape
    torch.Size([12, 8, 5])
    """
    if weight.dim() < 3 or weight.shape[0] != 4 or weight.shape[1] % groups:
        raise ValueError(
            f"weight must have shape (4, A, B, *kernel) with A divisible by groups={groups}, "
            f"got {tuple(weight.shape)}"
        )
    rows = weight.shape[1]
    index, sign = _fold_plan(rows, groups, transposed, weight.dtype, weight.device)
    folded = weight.reshape(4 * rows, -1).index_select(0, index) * sign
    return folded.view(4 * rows, 4 * weight.shape[2], *weight.shape[3:])


def _to_group_major(x: Tensor, groups: int) -> Tensor:
    return x.unflatten(1, (4, groups, -1)).transpose(1, 2).flatten(1, 3)


def _from_group_major(y: Tensor, groups: int) -> Tensor:
    return y.unflatten(1, (groups, 4, -1)).transpose(1, 2).flatten(1, 3)


# --------------------------------------------------------------------------- rank 8

_H = ((1.0, 1.0, 1.0, 1.0), (1.0, -1.0, 1.0, -1.0), (1.0, 1.0, -1.0, -1.0), (1.0, -1.0, -1.0, 1.0))
_CONJ = (1.0, -1.0, -1.0, -1.0)


# R products pair a_k with b_PAIR[k]: (a0 b0, a1 b3, a2 b1, a3 b2), so the weight side of
# the R half is the weight itself, never a copy. OUT_R[k] = (output component, coefficient).
_PAIR = (0, 3, 1, 2)
_OUT_R = ((0, 2.0), (2, -2.0), (3, -2.0), (1, -2.0))


@_constant_cache
def _coefficients(
    conj_a: bool, conj_b: bool, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pre-addition matrices of the left and right operands (4x4 each, for the Q half)
    and the post-addition matrices of the Q and R halves (4x4 each) of the rank-8 product
    (REFERENCES.md): Q_i = (H a)_i (H b)_i, R = (a0 b0, a3 b2, a1 b3, a2 b1), G = H Q / 4,
    a (x) b = (2 R0 - G0, G1 - 2 R1, G2 - 2 R2, G3 - 2 R3). Conjugating an operand flips
    the signs of its imaginary components: in the pre-additions for Q, in the post-additions
    for R (whose operands are used as they are)."""
    h = torch.tensor(_H, dtype=torch.float64)
    signs = torch.tensor(_CONJ, dtype=torch.float64)
    ones = torch.ones(4, dtype=torch.float64)
    sign_a, sign_b = (signs if conj_a else ones), (signs if conj_b else ones)
    post_q = torch.diag(torch.tensor([-0.25, 0.25, 0.25, 0.25], dtype=torch.float64)) @ h
    post_r = torch.zeros(4, 4, dtype=torch.float64)
    for k, (out, coefficient) in enumerate(_OUT_R):
        post_r[out, k] = coefficient * sign_a[k] * sign_b[_PAIR[k]]
    mats = (h * sign_a, h * sign_b, post_q, post_r)
    return tuple(m.to(dtype=dtype, device=device) for m in mats)


def _mix(coefficients: Tensor, stacked: Tensor) -> Tensor:
    """``coefficients (k, 4)`` applied along the leading axis of ``stacked (4, ...)``."""
    flat = stacked.reshape(stacked.shape[0], -1)
    return (coefficients @ flat).view(coefficients.shape[0], *stacked.shape[1:])


def _rank8(
    a: Tensor,
    b: Tensor,
    products: Callable[[Tensor, Tensor], Tensor],
    *,
    conj_a: bool = False,
    conj_b: bool = False,
    blocked: bool = False,
) -> Tensor:
    """The quaternion product ``a (x) b`` (conjugating either side on request) for any
    bilinear real product. ``a`` and ``b`` hold components on axis 0; ``products`` maps 4
    stacked left and right operands to the 4 stacked real products; it is called twice:
    on the Hadamard combinations (Q) and on ``a`` with reordered ``b`` (R). The result
    has the components on axis 0, or, with ``blocked``, is the blocked ``(N, 4C)`` matrix
    written by the post-additions (no extra copy). Used by the linear map; the convolution
    has its own chunked form (:class:`_Rank8Conv`)."""
    left, right, post_q, post_r = _coefficients(conj_a, conj_b, a.dtype, a.device)
    q = products(_mix(left, a), _mix(right, b))
    r = products(a, b[list(_PAIR)])
    if not blocked:
        return torch.addmm(post_q @ q.flatten(1), post_r, r.flatten(1)).view(q.shape)
    n = q.shape[1]  # (4, N, C, ...) -> per sample (4, C * ...) matrices, mixed by 4x4 ones
    qs, rs = q.transpose(0, 1).flatten(2), r.transpose(0, 1).flatten(2)
    y = torch.baddbmm(torch.matmul(post_q, qs), post_r.expand(n, 4, 4), rs)
    return y.view(n, -1, *q.shape[3:])


class _Conv(NamedTuple):
    """Geometry of a convolution, shared by the 8 products and their gradients (a plain
    tuple, so that torch.compile treats it as a constant)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    output_padding: tuple[int, ...]
    groups: int


def _convolve(g: _Conv, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    nd = len(g.stride)
    if g.transposed:  # the torch.nn.functional entry points honour autocast
        return getattr(F, f"conv_transpose{nd}d")(
            x, w, bias, g.stride, g.padding, g.output_padding, g.groups, g.dilation
        )
    return getattr(F, f"conv{nd}d")(x, w, bias, g.stride, g.padding, g.dilation, g.groups)


def _convolve_backward(g: _Conv, grad: Tensor, x: Tensor, w: Tensor, which: int) -> Tensor:
    """Gradient of a convolution w.r.t. its input (``which=0``) or weight (``which=1``)."""
    mask = [which == 0, which == 1, False]
    return torch.ops.aten.convolution_backward(
        grad,
        x,
        w,
        None,
        g.stride,
        g.padding,
        g.dilation,
        g.transposed,
        g.output_padding,
        g.groups,
        mask,
    )[which]


def _stacked(x: Tensor, dim: int) -> Tensor:
    """Blocked tensor -> components on a new leading axis (a view)."""
    return x.unflatten(dim, (4, -1)).movedim(dim, 0)


def _no_double_backward() -> None:
    if torch.is_grad_enabled():  # backward(create_graph=True) records a graph
        raise RuntimeError(
            "quatnn: the rank8 algorithm does not support double backward "
            "(create_graph=True); use algorithm='block' for higher-order gradients"
        )


class _Rank8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:  # x: (B, 4I), weight (4, O, I)
        ctx.save_for_backward(x, weight)
        return _rank8(
            weight, _stacked(x, 1), lambda w, v: torch.bmm(v, w.transpose(1, 2)), blocked=True
        )

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        _no_double_backward()
        x, weight = ctx.saved_tensors
        g = _stacked(grad, 1)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # dx = W^H (x) dy: per part dy @ W
            grad_x = _rank8(weight, g, lambda w, d: torch.bmm(d, w), conj_a=True, blocked=True)
        if ctx.needs_input_grad[1]:  # dW = dy (x) conj(x): per part dy^T @ x
            grad_w = _rank8(
                g,
                _stacked(x, 1),
                lambda d, v: torch.bmm(d.transpose(1, 2), v),
                conj_b=True,
            )
        return grad_x, grad_w


# The convolution runs the rank-8 product on batch chunks, on the component planes of the
# blocked tensors: the pre- and post-additions are butterflies (two add/sub stages) whose
# temporaries stay small enough for the CPU caches and for malloc to recycle (full-size
# temporaries were page-faulted anew on every call and cost more than the arithmetic saved),
# and the scalings of the post-additions are folded into the (small) weight operands.
_CHUNK_BYTES = 2 << 20  # bytes of one component plane of one chunk


def _hadamard(parts: Sequence[Tensor], conj: bool = False) -> tuple[Tensor, ...]:
    """``H p`` (or ``H conj(p)``) for the 4 component planes ``p``, in two butterfly stages."""
    p0, p1, p2, p3 = parts
    if conj:  # rows (1,-1,-1,-1), (1,1,-1,1), (1,-1,1,1), (1,1,1,-1)
        a, b, c, d = p0 - p1, p0 + p1, p2 + p3, p2 - p3
        return a - c, b - d, a + c, b + d
    a, b, c, d = p0 + p1, p0 - p1, p2 + p3, p2 - p3
    return a + c, b + d, a - c, b - d


def _post_add(q: Sequence[Tensor], r: Sequence[Tensor], out: Sequence[Tensor]) -> None:
    """Write the post-additions into the component planes ``out``: ``out[c] = s_c (H Q)_c
    + R_k`` for the ``k`` with ``_OUT_R[k][0] == c``, where ``s = (-1, 1, 1, 1)`` (the
    signs of ``post_q``); the ``1/4`` of ``post_q`` and the coefficients of ``post_r`` are
    already in the weight operands (:func:`_weight_operands`)."""
    u0, u1, u2, u3 = q[0] + q[1], q[0] - q[1], q[2] + q[3], q[2] - q[3]
    torch.sub(r[0], u0, out=out[0]).sub_(u2)
    torch.add(u1, u3, out=out[1]).add_(r[3])
    torch.sub(u0, u2, out=out[2]).add_(r[1])
    torch.sub(u1, u3, out=out[3]).add_(r[2])


def _weight_operands(weight: Tensor, conj: bool) -> tuple[Tensor, Tensor]:
    """The weight sides of the Q half (``H w / 4``) and the R half (``w_k`` times its
    post-addition coefficient), conjugating ``w`` on request, for :func:`_post_add`."""
    left, _, post_q, post_r = _coefficients(conj, False, weight.dtype, weight.device)
    q = _mix(left * post_q[1, 0], weight)  # post_q = diag(-1, 1, 1, 1) H / 4
    r_scale = post_r.sum(0)  # one nonzero per column
    return q, weight * r_scale.view(4, *([1] * (weight.dim() - 1)))


def _chunks(x: Tensor, *others: Tensor) -> Iterator[slice]:
    """Slices of the batch such that a component plane of each tensor stays within
    ``_CHUNK_BYTES`` on the CPU (one slice, maybe empty, at least). Other devices take the
    whole batch: their caching allocators recycle memory and each chunk costs launches."""
    plane = max(math.prod(t.shape[1:]) * t.element_size() // 4 for t in (x, *others))
    step = max(1, _CHUNK_BYTES // max(1, plane)) if x.device.type == "cpu" else max(len(x), 1)
    return (slice(i, i + step) for i in range(0, max(len(x), 1), step))


def _memory_format(x: Tensor) -> torch.memory_format:
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if channels_last and not x.is_contiguous() and x.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


def _planes(x: Tensor, rows: slice) -> tuple[Tensor, ...]:
    """The 4 component planes ``(n, C, ...)`` of rows of a blocked tensor (views)."""
    return x[rows].unflatten(1, (4, -1)).unbind(1)


class _Rank8Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, conv: _Conv) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conv = conv
        wq, wr = _weight_operands(weight, conj=False)
        y = None
        bias = None if bias is None else bias.view(1, -1, *([1] * (x.dim() - 2)))
        for rows in _chunks(x):
            xp = _planes(x, rows)
            hx = _hadamard(xp)
            q = [_convolve(conv, hx[k], wq[k]) for k in range(4)]
            r = [_convolve(conv, xp[_PAIR[k]], wr[k]) for k in range(4)]
            if y is None:  # in x's memory format, as torch's convolutions do
                size = (len(x), 4 * q[0].shape[1], *q[0].shape[2:])
                y = torch.empty(
                    size, dtype=x.dtype, device=x.device, memory_format=_memory_format(x)
                )
            _post_add(q, r, _planes(y, rows))
            if bias is not None:  # while the chunk is in the caches
                y[rows] += bias
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        _no_double_backward()
        x, weight = ctx.saved_tensors
        conv: _Conv = ctx.conv
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None
        # dW = dy (x) conj(x): its 8 products summed over the chunks, post-added once
        q_sum, r_sum = torch.zeros((2, *weight.shape), dtype=x.dtype, device=x.device)
        if need_x:  # dx = W^H (x) dy
            wq, wr = _weight_operands(weight, conj=True)
        for rows in _chunks(x, grad):
            gp = _planes(grad, rows)
            hg = _hadamard(gp)
            xp = _planes(x, rows)
            if need_x:
                q = [_convolve_backward(conv, hg[k], xp[0], wq[k], 0) for k in range(4)]
                r = [_convolve_backward(conv, gp[_PAIR[k]], xp[0], wr[k], 0) for k in range(4)]
                _post_add(q, r, _planes(grad_x, rows))
            if need_w:
                hx = _hadamard(xp, conj=True)
                for k in range(4):
                    q_sum[k] += _convolve_backward(conv, hg[k], hx[k], weight[0], 1)
                    r_sum[k] += _convolve_backward(conv, gp[k], xp[_PAIR[k]], weight[0], 1)
        grad_w = None
        if need_w:
            _, _, post_q, post_r = _coefficients(False, True, x.dtype, x.device)
            grad_w = _mix(post_q, q_sum) + _mix(post_r, r_sum)
        grad_bias = grad.sum([0, *range(2, grad.dim())]) if need_bias else None
        return grad_x, grad_w, grad_bias, None


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device_type`` (a no-op where the device has no
    autocast, such as ``meta``): for code that must compute in its inputs' dtype.

    >>> with autocast_disabled("meta"):
    ...     pass
    """
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _rank8_apply(fn: type[torch.autograd.Function], x: Tensor, weight: Tensor, *args) -> Tensor:
    """Run a rank-8 Function in the promoted dtype with autocast off (tensors in ``args``,
    the bias, are cast too)."""
    device = x.device.type
    if transforming():
        raise RuntimeError(
            "quatnn: the rank8 algorithm does not support torch.func transforms (vmap, grad, "
            "...); use algorithm='block' (or 'auto', which picks it under them)"
        )
    if x.dtype != weight.dtype and not _autocasting(device):  # as torch.nn layers (and block) do
        raise RuntimeError(
            f"quatnn: input dtype {x.dtype} and weight dtype {weight.dtype} differ; cast one "
            "(under autocast they may)"
        )
    dtype = torch.promote_types(x.dtype, weight.dtype)
    args = tuple(a.to(dtype) if isinstance(a, Tensor) else a for a in args)
    with autocast_disabled(device):
        return fn.apply(x.to(dtype), weight.to(dtype), *args)


# --------------------------------------------------------------------------- public API


def quaternion_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    algorithm: str = "auto",
    folded: Tensor | None = None,
) -> Tensor:
    """Quaternion linear map of ``x (..., 4I)`` with ``weight (4, O, I)`` -> ``(..., 4O)``.

    ``folded`` may pass a precomputed :func:`block_weight` (used by the block path only).

    >>> quaternion_linear(torch.randn(5, 8), torch.randn(4, 1, 2)).shape
    torch.Size([5, 4])
    """
    if weight.dim() != 3 or weight.shape[0] != 4:
        raise ValueError(f"weight must have shape (4, out/4, in/4), got {tuple(weight.shape)}")
    n_in = 4 * weight.shape[2]
    if x.dim() == 0 or x.shape[-1] != n_in:
        raise ValueError(
            f"input has {x.shape[-1] if x.dim() else 0} features on its last axis, "
            f"expected in_features={n_in}"
        )
    rows = x.numel() // n_in
    macs = rows * weight.shape[1] * weight.shape[2]
    algo = resolve_algorithm(algorithm, x, macs, min(weight.shape[1], weight.shape[2]))
    if algo == "block" or rows == 0:  # an empty batch needs no products
        return F.linear(x, block_weight(weight) if folded is None else folded, bias)
    y = _rank8_apply(_Rank8Linear, x.reshape(rows, n_in), weight)
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


def _tuple(value: int | Sequence[int], nd: int, name: str, minimum: int = 0) -> tuple[int, ...]:
    """``value`` as ``nd`` ints of at least ``minimum`` (ValueError naming ``name``)."""
    values = (value,) * nd if isinstance(value, int) else tuple(value)
    if len(values) != nd:
        raise ValueError(f"{name} must be an int or a tuple of {nd} ints, got {value}")
    if any(v < minimum for v in values):
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return values


def same_padding(kernel: Sequence[int], dilation: Sequence[int]) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim that keeps the size at stride 1 (the extra
    pixel of an odd total goes right, as in ``torch.nn.functional.conv2d(padding='same')``)."""
    totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
    return [(t // 2, t - t // 2) for t in totals]


def quaternion_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    transposed: bool = False,
    output_padding: int | Sequence[int] = 0,
    algorithm: str = "auto",
    folded: Tensor | None = None,
) -> Tensor:
    """N-d quaternion (transposed) convolution of a blocked ``x (N, 4I, *spatial)``.

    ``weight`` is ``(4, O, I/g, *k)``, or ``(4, I, O/g, *k)`` when ``transposed`` (the
    ``torch.nn`` orders). ``padding`` may be ``"same"``/``"valid"`` (not transposed).

    >>> quaternion_conv(torch.randn(1, 8, 5, 5), torch.randn(4, 2, 2, 3, 3), padding=1).shape
    torch.Size([1, 8, 5, 5])
    """
    nd = weight.dim() - 3
    if weight.shape[0] != 4 or nd < 1:
        raise ValueError(f"weight must have shape (4, A, B, *kernel), got {tuple(weight.shape)}")
    if not isinstance(groups, int) or groups < 1 or weight.shape[1] % groups:
        raise ValueError(
            f"groups must be a positive int dividing weight.shape[1]={weight.shape[1]}, "
            f"got {groups}"
        )
    if x.dim() != nd + 2:
        raise ValueError(
            f"expected a {nd + 2}-d input (N, C, *spatial), got shape {tuple(x.shape)}"
        )
    n_in = 4 * (weight.shape[1] if transposed else weight.shape[2] * groups)
    if x.shape[1] != n_in:
        raise ValueError(f"input has {x.shape[1]} channels, expected in_channels={n_in}")
    kernel, dil = weight.shape[3:], _tuple(dilation, nd, "dilation", 1)
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        elif padding == "same" and not transposed:
            if any(s != 1 for s in _tuple(stride, nd, "stride", 1)):
                raise ValueError("padding='same' needs stride 1")
            pads = same_padding(kernel, dil)
            if any(lo != hi for lo, hi in pads):
                x = F.pad(x, [p for pair in reversed(pads) for p in pair])
                padding = 0
            else:
                padding = tuple(lo for lo, _ in pads)
        else:
            raise ValueError(f"padding must be an int, a tuple, 'valid' or 'same', got {padding!r}")
    conv = _Conv(
        _tuple(stride, nd, "stride", 1),
        _tuple(padding, nd, "padding"),
        dil,
        transposed,
        _tuple(output_padding, nd, "output_padding"),
        groups,
    )
    out_positions = x.shape[0] * math.prod(x.shape[2:])  # ~ output positions x stride^nd
    if not transposed:
        out_positions //= math.prod(conv.stride)
    macs = out_positions * weight.shape[1] * weight.shape[2] * math.prod(kernel)
    per_group = weight.shape[2] if transposed else weight.shape[1] // groups
    channels = min(per_group, weight.shape[1] // groups if transposed else weight.shape[2])
    algo = resolve_algorithm(algorithm, x, macs, channels, "conv")
    if algo == "rank8":
        return _rank8_apply(_Rank8Conv, x, weight, bias, conv)
    w = block_weight(weight, groups, transposed) if folded is None else folded
    if groups == 1:
        return _convolve(conv, x, w, bias)
    layout = _memory_format(x)  # kept through the channel permutations, as torch does
    xg = _to_group_major(x, groups).contiguous(memory_format=layout)
    y = _from_group_major(_convolve(conv, xg, w), groups).contiguous(memory_format=layout)
    return y if bias is None else y + bias.view(1, -1, *([1] * nd))
