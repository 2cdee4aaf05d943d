"""Fast quaternion linear maps and convolutions, and the choice between two algorithms.

Both compute ``y_o = sum_i W_oi (x) x_i + b_o`` (left Hamilton product, DESIGN.md) on
component-blocked tensors:

* ``"block"``: fold ``W`` into the 16-block real matrix (:func:`block_weight`) and run one
  real GEMM/convolution. Few kernels, so it wins on small layers and under autocast. With
  fewer output positions (rows of a linear map's input) than input quaternions x kernel
  size, it applies the signs to the 16 component products instead of folding the weight
  (fewer elements to move; :func:`_sum_products`).
* ``"rank8"``: quaternion multiplication has bilinear rank 8 (Howell & Lafon 1975), so the
  quaternion product is formed from 8 real products of quaternion size (4 on pre-added,
  Hadamard, combinations of weight and input, 4 on single components), then post-added:
  half the multiply-adds of the real layer of the same width. Its backward is the same
  decomposition transposed (the linear map keeps its pre-added input for it), so no
  16-block matrix is ever formed.
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
# side of it, only while gradients are recorded). Measured on 2 CPU threads with `quatnn
# bench layers` (its --linear/--conv options time any sizes: sweeps of convolution sizes
# and of linear widths 384-2048 at batches 64-1024, README): smaller products lose more to
# the extra element-wise passes and kernel calls than the halved arithmetic saves (a
# linear layer of 128 quaternions tied at every batch, one of 160 won or tied, in training
# from batch 64: 1.14x-1.20x the real layer against 1.37x-1.83x for block's weight fold;
# beside block's products side, at batch 64: 1.16x vs 1.22x at width 640, 0.96x vs 1.11x
# at 1024, middle layers), and oneDNN runs narrow convolutions less efficiently (at 16
# quaternion channels only the backward gains enough). On CUDA (H200, torch 2.11, float32
# matmuls at full precision) rank8's extra kernels lose wherever launches or element-wise
# passes weigh: 2.2x-14x the real layer at every default size (block 1.04x-2.5x), 1.43x at
# linear 4096 batch 1024 (2**30 multiply-adds a product) and 1.99x at conv 256 channels
# batch 256; it won at linear 8192 batch 4096 (2**34): 0.58x fwd+bwd, 0.62x fwd, block
# 1.05x. So CUDA has a linear rule from there, not taken when TF32 matmuls are allowed
# (they speed the real products up, not rank8's element-wise passes).
RANK8_RULES = {
    "cpu": {
        "linear": ((2**21, 160, False), (2**20, 160, True)),
        "conv": ((2**25, 32, False), (2**27, 16, True)),
    },
    "cuda": {"linear": ((2**34, 2048, False),)},
}

# On CPU a folded weight from this size up is read from memory on every call, and block's
# products side reads a quarter of it: calls that may take the products side do so even
# when a folded weight is cached (fold_cache). Measured on 2 CPU threads, inference,
# linear layers of width 4q at batches 1-32: with a 4 MiB fold (q = 256) the products side
# tied at batch 1 and won from batch 8 (168 vs 298 us), at 16-64 MiB it took 0.3x-0.8x
# the cached fold's time; at 1 MiB and below the cached fold won (25 vs 33 us at batch 1).
# Late 3x3 convolutions (9 MiB folds) tied or won (481 vs 618 us, 512 channels 4x4).
CACHED_FOLD_MAX_BYTES = {"cpu": 4 * 2**20}

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


def _autocast_available(device_type: str) -> bool:
    """``torch.amp.is_autocast_available``, which torch.compile cannot trace in some torch
    versions (2.11: a graph break at every call); a traced tensor's device has autocast."""
    return torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)


def _autocasting(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (never on devices without it: meta)."""
    return _autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _plain_block_only(x: Tensor) -> bool:
    """Whether only the plain block path (folded weight, one torch.nn product) may run:
    while torch.export or torch.jit traces (an exported graph must not branch on the batch
    size), under autocast, under torch.func transforms, and for 16-bit inputs."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()  # torch >= 2.5
    return (
        exporting
        or torch.jit.is_tracing()
        or _autocasting(x.device.type)
        or transforming()
        or x.dtype in (torch.float16, torch.bfloat16)
    )


def resolve_algorithm(
    algorithm: str, x: Tensor, macs_per_product: int, channels: int, kind: str = "linear"
) -> str:
    """The algorithm a call will use: the :func:`use_algorithm` override if set, else
    ``algorithm`` unless it is ``"auto"``. ``"auto"`` picks ``"block"`` under autocast, for
    16-bit inputs, while ``torch.export`` or ``torch.jit`` traces (so that an exported
    graph has no branch on the batch size and keeps it dynamic) and under ``torch.func``
    transforms (vmap, grad, ...: the rank-8 Functions do not support them); ``"rank8"``
    where an option of :data:`RANK8_RULES` says it wins (one real product has at least
    that many multiply-adds, ``channels`` = the fewer quaternion channels per group of
    input and output reaches the minimum, gradients are recorded if the option needs
    them; on CUDA not while TF32 matmuls are allowed); ``"block"`` otherwise. ``kind`` is
    ``"linear"`` or ``"conv"``."""
    return _resolve(algorithm, x, macs_per_product, channels, kind, _plain_block_only(x))


def _resolve(
    algorithm: str, x: Tensor, macs_per_product: int, channels: int, kind: str, plain: bool
) -> str:
    """:func:`resolve_algorithm` with :func:`_plain_block_only` of ``x`` given (the layers
    need it again for block's products side)."""
    chosen = _override if _override not in (None, "auto") else algorithm
    if chosen not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {chosen!r}")
    if chosen != "auto":
        return chosen
    if plain:
        return "block"
    grad = torch.is_grad_enabled()
    for min_macs, min_channels, needs_grad in RANK8_RULES.get(x.device.type, {}).get(kind, ()):
        if macs_per_product >= min_macs and channels >= min_channels and (grad or not needs_grad):
            tf32 = x.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
            return "block" if tf32 else "rank8"
    return "block"


# --------------------------------------------------------------------------- block fold

# L(a) = [[a0,-a1,-a2,-a3],[a1,a0,-a3,a2],[a2,a3,a0,-a1],[a3,-a2,a1,a0]] (DESIGN.md)
_BLOCK_INDEX = ((0, 1, 2, 3), (1, 0, 3, 2), (2, 3, 0, 1), (3, 2, 1, 0))
_BLOCK_SIGN = ((1, -1, -1, -1), (1, 1, -1, 1), (1, 1, 1, -1), (1, -1, 1, 1))


def _constant_cache(fn: Callable[..., object]) -> Callable[..., object]:
    """``functools.cache`` for small constant tensors (here and in the norms: one entry per
    layer shape, dtype and device in use: a bounded cache would rebuild them on every call
    of a model with more shapes than its size), bypassed while torch.compile or
    torch.export traces: the cache would keep the fake tensors of the trace and hand them
    to later eager calls."""
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
    the result is a signed copy of a row of ``weight``: one gather and a multiply in place
    (no second copy of the folded size), and their backward is as cheap.

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
    folded = weight.reshape(4 * rows, -1).index_select(0, index).mul_(sign)
    return folded.view(4 * rows, 4 * weight.shape[2], *weight.shape[3:])


@_constant_cache
def _product_plan(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The signed sums of :func:`_sum_products` as a ``(4, 16)`` matrix: entry ``(o, 4c + k)``
    is the sign (as in :func:`block_weight`) with which output component ``o`` takes the
    product ``x_c w_k``, zero where it does not take it (the one ``k`` per ``c`` and ``o``)."""
    plan = [[0.0] * 16 for _ in range(4)]
    for o, c in itertools.product(range(4), range(4)):
        plan[o][4 * c + _BLOCK_INDEX[o][c]] = float(_BLOCK_SIGN[o][c])
    return torch.tensor(plan, dtype=dtype, device=device)


def _sum_products(z: Tensor, rows: int) -> Tensor:
    """Block's products side: ``z (4 rows, 4O, *rest)`` holds, at row ``4r + c`` and
    channel ``kO + o``, the real product of input component ``c`` with weight component
    ``k`` (one real GEMM/convolution of the input's component rows, a view, with the 4
    stacked weight components forms all 16). Each output component is a signed sum of
    four of them: ``(rows, 4O, *rest)``, one batched product with :func:`_product_plan`
    (one kernel each way: a gather, sign and sum took 1.2x-1.8x its time forward and
    backward on CPU). Its passes cover ``16 rows O rest`` elements where folding the weight
    moves ``16 O I kernel``: the cheaper side for few output positions."""
    y = torch.matmul(_product_plan(z.dtype, z.device), z.reshape(rows, 16, -1))
    return y.view(rows, *z.shape[1:])


def _to_group_major(x: Tensor, groups: int) -> Tensor:
    return x.unflatten(1, (4, groups, -1)).transpose(1, 2).flatten(1, 3)


def _from_group_major(y: Tensor, groups: int) -> Tensor:
    return y.unflatten(1, (groups, 4, -1)).transpose(1, 2).flatten(1, 3)


# --------------------------------------------------------------------------- rank 8

# The rank-8 decomposition used here (a variant of the one in REFERENCES.md, checked
# against the Hamilton product by the tests; it holds for matrix-valued components):
#   a (x) b = H q + 2 r,   q_k = -(G a)_k (G b)_k / 4,   r_k = a_k b_R_IN[k] -> output R_OUT[k]
# with H the 4x4 Hadamard matrix (rows ++++, +-+-, ++--, +--+), G = H diag(1,-1,-1,-1),
# and r the products 1 1 -> 1, i j -> k, j k -> i, k i -> j. Forward y = W (x) x: pre-add
# x and W with G, 8 real products, post-add with H. Backward is the same algorithm
# transposed: pre-add dy with H (the R products take dy as it is), 8 transposed products
# each for dx and dW, post-add both with G^T. A training step costs 24 quaternion-size
# products instead of the 48 of the 16-block matrix.
_R_IN = (0, 2, 3, 1)  # R product k: weight component k times input component R_IN[k]
_R_OUT = (0, 3, 1, 2)  # ... into output component R_OUT[k] (the inverse permutation)
_Q_SCALE, _R_SCALE = -0.25, 2.0

# A 4x4 +-1 transform as two butterfly stages over 4 planes (slots). A stage
# (a, b, plus, minus, flip) writes out[plus[p]] = s[a[p]] + s[b[p]] and out[minus[p]] =
# s[a[p]] - s[b[p]] (s[b[p]] - s[a[p]] with flip) for p = 0, 1. Found by enumerating every
# two-stage plan: G sends input components to the 4 Q slots in the order q0, q2, q1, q3,
# H maps those slots back to output components (and output gradients to Q slots), and
# G^T maps Q slots to input components.
_Plan = tuple[tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], bool], ...]
_PRE: _Plan = (((0, 1), (2, 3), (1, 2), (0, 3), False), ((0, 1), (2, 3), (2, 3), (0, 1), False))
_POST: _Plan = (((0, 1), (2, 3), (0, 1), (2, 3), False), ((0, 2), (1, 3), (0, 1), (2, 3), False))
_PRE_T: _Plan = (((0, 3), (1, 2), (0, 1), (2, 3), True), ((0, 3), (1, 2), (0, 3), (1, 2), True))


def _butterfly(
    src: Sequence[Tensor],
    plan: _Plan,
    out: Sequence[Tensor] | None = None,
    extra: Sequence[Tensor] | None = None,
) -> list[Tensor]:
    """Apply ``plan`` to the 4 planes ``src``: 8 element-wise passes (12 with ``extra``),
    written into the planes ``out`` if given, with ``extra[j]`` added to output plane
    ``j`` if given."""
    planes = list(src)
    for stage, (a, b, plus, minus, flip) in enumerate(plan):
        last = stage == len(plan) - 1
        result = list(planes)  # every slot is overwritten
        for p in range(2):
            first, second = planes[a[p]], planes[b[p]]
            for slot, subtract in ((plus[p], False), (minus[p], True)):
                lhs, rhs = (second, first) if subtract and flip else (first, second)
                op = torch.sub if subtract else torch.add
                if not last or out is None:
                    result[slot] = op(lhs, rhs)
                elif extra is None:
                    result[slot] = op(lhs, rhs, out=out[slot])
                else:
                    result[slot] = torch.add(extra[slot], lhs, out=out[slot])
                    (result[slot].sub_ if subtract else result[slot].add_)(rhs)
        planes = result
    return planes


def _by_output(r: Sequence[Tensor]) -> list[Tensor]:
    """The R products (weight order) in output component order."""
    return [r[_R_OUT.index(c)] for c in range(4)]


def _by_input(r: Sequence[Tensor]) -> list[Tensor]:
    """Per-R-product gradients (weight order) in input component order."""
    return [r[_R_IN.index(j)] for j in range(4)]


def _components(x: Tensor) -> Tensor:
    """Blocked ``(N, 4C, ...)`` -> a view ``(4, N, C, ...)`` of its component planes."""
    return x.unflatten(1, (4, -1)).movedim(1, 0)


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


def _block_grads(
    need: Sequence[bool], x: Tensor, weight: Tensor, grad: Tensor, conv: _Conv | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """The input and weight gradients (where ``need``-ed) of the same product (a linear
    map, or ``conv``) in block's differentiable ops for ``grad``, recorded: what a rank-8
    backward returns when asked for a graph (``create_graph=True``: double backward,
    gradient penalties)."""
    inputs = [t for t, n in zip((x, weight), need, strict=True) if n]
    if not inputs:  # only the bias's gradient was asked for
        return None, None
    with torch.enable_grad():
        if conv is None:
            y = F.linear(x, block_weight(weight))
        else:
            y = _block_conv(conv, x, block_weight(weight, conv.groups, conv.transposed))
        grads = iter(torch.autograd.grad(y, inputs, grad, create_graph=True))
    return next(grads) if need[0] else None, next(grads) if need[1] else None


class _Rank8Linear(torch.autograd.Function):
    """``x (N, 4I)``, ``weight (4, O, I)``, optional ``bias (4O)`` -> ``(N, 4O)``. The 4 Q
    products of each pass are one batched matrix product, scaled by the product
    (``alpha``) rather than by a pass over the (large) weight operand; the 4 R products
    accumulate straight into the component planes of the result (``addmm_``)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        xs = _components(x)
        gx = torch.empty_like(xs, memory_format=torch.contiguous_format)
        _butterfly(xs, _PRE, out=gx)
        gw = torch.empty_like(weight)
        _butterfly(weight, _PRE, out=gw)
        q = torch.baddbmm(x.new_zeros(()), gx, gw.mT, beta=0, alpha=_Q_SCALE)
        y = x.new_empty(len(x), 4 * weight.shape[1])
        ys = _components(y)
        _butterfly(q, _POST, out=ys, extra=None if bias is None else bias.view(4, 1, -1))
        for k in range(4):
            ys[_R_OUT[k]].addmm_(xs[_R_IN[k]], weight[k].T, alpha=_R_SCALE)
        ctx.save_for_backward(x, gx, gw, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, gx, gw, weight = ctx.saved_tensors
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if torch.is_grad_enabled():  # create_graph=True
            return *_block_grads(ctx.needs_input_grad[:2], x, weight, grad), grad_bias
        xs, gs = _components(x), _components(grad)
        dq = torch.empty_like(gs, memory_format=torch.contiguous_format)
        _butterfly(gs, _POST, out=dq)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            du = torch.baddbmm(grad.new_zeros(()), dq, gw, beta=0, alpha=_Q_SCALE)
            grad_x = grad.new_empty(len(grad), 4 * weight.shape[2])
            grad_xs = _components(grad_x)
            _butterfly(du, _PRE_T, out=grad_xs)
            for k in range(4):
                grad_xs[_R_IN[k]].addmm_(gs[_R_OUT[k]], weight[k], alpha=_R_SCALE)
        if ctx.needs_input_grad[1]:
            dv = torch.baddbmm(grad.new_zeros(()), dq.mT, gx, beta=0, alpha=_Q_SCALE)
            grad_w = torch.empty_like(weight)
            _butterfly(dv, _PRE_T, out=grad_w)
            for k in range(4):
                grad_w[k].addmm_(gs[_R_OUT[k]].T, xs[_R_IN[k]], alpha=_R_SCALE)
        return grad_x, grad_w, grad_bias


# The convolution runs the 8 products as separate convolutions (one grouped convolution of
# 8 groups was slower in oneDNN) on chunks of the batch: the pre- and post-additions then
# work on temporaries small enough for the CPU caches and for malloc to recycle
# (full-size temporaries were page-faulted anew on every call and cost more than the
# arithmetic saved).
_CHUNK_BYTES = 2 << 20  # bytes of one component plane of one chunk


def _chunks(x: Tensor, *others: Tensor) -> Iterator[slice]:
    """Slices of the batch such that a component plane of each tensor stays within
    ``_CHUNK_BYTES`` on the CPU (one slice, maybe empty, at least). Other devices take the
    whole batch: their caching allocators recycle memory and each chunk costs launches."""
    plane = max(math.prod(t.shape[1:]) * t.element_size() // 4 for t in (x, *others))
    step = max(1, _CHUNK_BYTES // max(1, plane)) if x.device.type == "cpu" else max(len(x), 1)
    return (slice(i, i + step) for i in range(0, max(len(x), 1), step))


def _memory_format(x: Tensor) -> torch.memory_format:
    """``x``'s channels_last format where it is in one (and not also plain contiguous)."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if channels_last and not x.is_contiguous() and x.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


def _conv_weights(weight: Tensor) -> Tensor:
    """The 8 (small) weight operands of the convolution, scaled: ``(8, *weight.shape[1:])``
    holding ``-(G W)/4`` in the Q slot order, then ``2 W``."""
    w8 = weight.new_empty(8, *weight.shape[1:])
    _butterfly(weight, _PRE, out=w8[:4])
    w8[:4].mul_(_Q_SCALE)
    torch.mul(weight, _R_SCALE, out=w8[4:])
    return w8


class _Rank8Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, conv: _Conv) -> Tensor:
        w8 = _conv_weights(weight)
        ctx.save_for_backward(x, w8, weight)
        ctx.conv = conv
        bias4 = [None] * 4 if bias is None else bias.view(4, -1).unbind()
        y = None
        for rows in _chunks(x):
            xs = _components(x[rows])
            gx = _butterfly(xs, _PRE)
            q = [_convolve(conv, gx[k], w8[k]) for k in range(4)]
            r = [_convolve(conv, xs[_R_IN[k]], w8[4 + k], bias4[_R_OUT[k]]) for k in range(4)]
            if y is None:  # in x's memory format, as torch's convolutions do
                size = (len(x), 4 * q[0].shape[1], *q[0].shape[2:])
                y = torch.empty(
                    size, dtype=x.dtype, device=x.device, memory_format=_memory_format(x)
                )
            _butterfly(q, _POST, out=_components(y[rows]), extra=_by_output(r))
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, w8, weight = ctx.saved_tensors
        conv: _Conv = ctx.conv
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        grad_bias = grad.sum([0, *range(2, grad.dim())]) if need_bias else None
        if torch.is_grad_enabled():  # create_graph=True
            return *_block_grads((need_x, need_w), x, weight, grad, conv), grad_bias, None
        grad_x = torch.empty_like(x) if need_x else None
        grads8 = torch.zeros_like(w8) if need_w else None  # summed over the chunks
        for rows in _chunks(x, grad):
            gs = _components(grad[rows])
            dq = _butterfly(gs, _POST)
            xs = _components(x[rows])
            if need_x:
                du = [_convolve_backward(conv, dq[k], xs[0], w8[k], 0) for k in range(4)]
                dr = [
                    _convolve_backward(conv, gs[_R_OUT[k]], xs[0], w8[4 + k], 0) for k in range(4)
                ]
                _butterfly(du, _PRE_T, out=_components(grad_x[rows]), extra=_by_input(dr))
            if need_w:
                gx = _butterfly(xs, _PRE)
                for k in range(4):
                    grads8[k] += _convolve_backward(conv, dq[k], gx[k], w8[0], 1)
                    grads8[4 + k] += _convolve_backward(conv, gs[_R_OUT[k]], xs[_R_IN[k]], w8[0], 1)
        grad_w = None
        if need_w:
            grad_w = torch.empty_like(grads8[:4])
            _butterfly(grads8[:4].mul_(_Q_SCALE), _PRE_T, out=grad_w)
            grad_w.add_(grads8[4:], alpha=_R_SCALE)
        return grad_x, grad_w, grad_bias, None


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device_type`` (a no-op where the device has no
    autocast, such as ``meta``): for code that must compute in its inputs' dtype.

    >>> with autocast_disabled("meta"):
    ...     pass
    """
    if _autocast_available(device_type):
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

_Folded = Tensor | Callable[[], Tensor | None] | None


def _given(folded: _Folded, x: Tensor, weight: Tensor, on_products: bool) -> Tensor | None:
    """The block weight passed as ``folded``, if any (a function is called for it), unless
    the call may take block's products side and the folded weight (4x ``weight``) reaches
    :data:`CACHED_FOLD_MAX_BYTES` on this device."""
    limit = CACHED_FOLD_MAX_BYTES.get(x.device.type)
    if on_products and limit is not None and 4 * weight.numel() * weight.element_size() >= limit:
        return None
    return folded() if callable(folded) else folded


def _plus_bias(y: Tensor, bias: Tensor | None, nd: int) -> Tensor:
    """``y + bias`` over the channel axis (the last one when ``nd`` is 0, else 1 of
    ``nd`` spatial dims), in ``y``'s dtype: under autocast a float32 bias must not promote
    the 16-bit result, as it does not in torch's layers."""
    return y if bias is None else y + bias.to(y.dtype).view(-1, *([1] * nd))


def quaternion_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    algorithm: str = "auto",
    folded: _Folded = None,
) -> Tensor:
    """Quaternion linear map of ``x (..., 4I)`` with ``weight (4, O, I)`` -> ``(..., 4O)``.

    ``folded`` may pass a precomputed :func:`block_weight`, or a function that returns one
    (or None) and is called only if the block path runs: layers pass their eval-mode cache
    this way, so that a call that takes rank8 never builds it. Calls that may take block's
    products side ignore a folded weight from :data:`CACHED_FOLD_MAX_BYTES` up.

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
    plain = _plain_block_only(x)
    algo = _resolve(algorithm, x, macs, min(weight.shape[1], weight.shape[2]), "linear", plain)
    if algo == "block" or rows == 0:  # an empty batch needs no products
        on_products = not plain and 0 < rows < weight.shape[2]
        given = _given(folded, x, weight, on_products)
        if given is None and on_products:
            z = torch.mm(x.reshape(4 * rows, -1), weight.reshape(-1, weight.shape[2]).t())
            return _plus_bias(_sum_products(z, rows).view(*x.shape[:-1], -1), bias, 0)
        return F.linear(x, block_weight(weight) if given is None else given, bias)
    y = _rank8_apply(_Rank8Linear, x.reshape(rows, n_in), weight, bias)
    return y.view(*x.shape[:-1], y.shape[-1])


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
    folded: _Folded = None,
) -> Tensor:
    """N-d quaternion (transposed) convolution of a blocked ``x (N, 4I, *spatial)`` (or an
    unbatched ``(4I, *spatial)``, as torch's convolutions take).

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
    if x.dim() == nd + 1:  # unbatched
        y = quaternion_conv(
            x.unsqueeze(0),
            weight,
            bias,
            stride,
            padding,
            dilation,
            groups,
            transposed=transposed,
            output_padding=output_padding,
            algorithm=algorithm,
            folded=folded,
        )
        return y.squeeze(0)
    if x.dim() != nd + 2:
        raise ValueError(
            f"expected a {nd + 2}-d input (N, C, *spatial) or a {nd + 1}-d unbatched one "
            f"(C, *spatial), got shape {tuple(x.shape)}"
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
    plain = _plain_block_only(x)
    algo = _resolve(algorithm, x, macs, channels, "conv", plain)
    if algo == "rank8":
        return _rank8_apply(_Rank8Conv, x, weight, bias, conv)
    n_in_q = weight.shape[1] if transposed else weight.shape[2]
    positions = out_positions * (math.prod(conv.stride) if transposed else 1)
    on_products = (  # fewer output positions than input quaternions x kernel size
        groups == 1
        and not plain
        and not torch.compiler.is_compiling()  # Inductor (2.14) fails on its dynamic shapes
        and x.is_contiguous()
        and weight.is_contiguous()
        and 0 < positions < n_in_q * math.prod(kernel)
    )
    w = _given(folded, x, weight, on_products)
    if w is None and on_products:
        stacked = weight.transpose(0, 1).flatten(1, 2) if transposed else weight.flatten(0, 1)
        z = _convolve(conv, x.reshape(4 * x.shape[0], n_in_q, *x.shape[2:]), stacked)
        return _plus_bias(_sum_products(z, x.shape[0]), bias, nd)
    return _block_conv(conv, x, block_weight(weight, groups, transposed) if w is None else w, bias)


def _block_conv(conv: _Conv, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """Block's convolution with the folded weight ``w`` (grouped: on the group-major
    channel order the folded weight has)."""
    if conv.groups == 1:
        return _convolve(conv, x, w, bias)
    layout = _memory_format(x)  # kept through the channel permutations, as torch does
    xg = _to_group_major(x, conv.groups).contiguous(memory_format=layout)
    y = _from_group_major(_convolve(conv, xg, w), conv.groups).contiguous(memory_format=layout)
    return _plus_bias(y, bias, x.dim() - 2)
