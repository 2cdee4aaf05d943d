"""Quaternion algebra on plain tensors, and the slow reference products used by the tests.

Two layouts appear in quatnn (see DESIGN.md):

* **explicit**: a trailing axis of size 4 holds ``(r, i, j, k)``;
* **blocked**: a feature axis of size ``4C`` holds ``[r_0..r_{C-1}, i_0.., j_0.., k_0..]``,
  the layout every layer takes and returns.

Example:
    >>> import torch
    >>> from quatnn import algebra
    >>> i, j = torch.tensor([0., 1, 0, 0]), torch.tensor([0., 0, 1, 0])
    >>> algebra.hamilton_product(i, j)  # i j = k
    tensor([0., 0., 0., 1.])
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "hamilton_product",
    "conjugate",
    "norm",
    "inverse",
    "normalize",
    "to_explicit",
    "to_blocked",
    "left_matrix",
    "reference_linear",
    "reference_conv",
]


def hamilton_product(p: Tensor, q: Tensor) -> Tensor:
    """Hamilton product of quaternions on the last axis (size 4), with broadcasting."""
    r1, x1, y1, z1 = p.unbind(-1)
    r2, x2, y2, z2 = q.unbind(-1)
    return torch.stack(
        (
            r1 * r2 - x1 * x2 - y1 * y2 - z1 * z2,
            r1 * x2 + x1 * r2 + y1 * z2 - z1 * y2,
            r1 * y2 - x1 * z2 + y1 * r2 + z1 * x2,
            r1 * z2 + x1 * y2 - y1 * x2 + z1 * r2,
        ),
        dim=-1,
    )


def conjugate(q: Tensor) -> Tensor:
    """``r - x i - y j - z k`` on the last axis."""
    return q * q.new_tensor([1.0, -1.0, -1.0, -1.0])


def norm(q: Tensor) -> Tensor:
    """Euclidean norm ``|q|`` over the last axis."""
    return torch.linalg.vector_norm(q, dim=-1)


def inverse(q: Tensor) -> Tensor:
    """``conj(q) / |q|^2``; raises for a zero quaternion instead of returning inf."""
    sq = (q * q).sum(-1, keepdim=True)
    if bool((sq == 0).any()):
        raise ValueError("inverse: a zero quaternion has no inverse")
    return conjugate(q) / sq


def normalize(q: Tensor, eps: float = 1e-12) -> Tensor:
    """Unit quaternions ``q / |q|`` (``eps`` guards zeros)."""
    return q / norm(q).clamp_min(eps).unsqueeze(-1)


def to_explicit(x: Tensor, dim: int = 1) -> Tensor:
    """Blocked ``(..., 4C, ...)`` on ``dim`` -> explicit ``(..., C, ..., 4)``."""
    dim = dim % x.dim()
    size = x.shape[dim]
    if size % 4:
        raise ValueError(f"to_explicit: axis {dim} has size {size}, not divisible by 4")
    parts = x.unflatten(dim, (4, size // 4))
    return parts.movedim(dim, -1)


def to_blocked(q: Tensor, dim: int = 1) -> Tensor:
    """Inverse of :func:`to_explicit`: explicit ``(..., C, ..., 4)`` -> blocked on ``dim``."""
    if q.shape[-1] != 4:
        raise ValueError(f"to_blocked: last axis must have size 4, got {q.shape[-1]}")
    dim = dim % (q.dim() - 1)
    return q.movedim(-1, dim).flatten(dim, dim + 1)


def left_matrix(q: Tensor) -> Tensor:
    """The real 4x4 matrix ``L(q)`` with ``L(q) @ p == hamilton_product(q, p)``."""
    r, x, y, z = q.unbind(-1)
    rows = (
        (r, -x, -y, -z),
        (x, r, -z, y),
        (y, z, r, -x),
        (z, -y, x, r),
    )
    return torch.stack([torch.stack(row, -1) for row in rows], -2)


def reference_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Slow, obvious quaternion linear map ``y_o = sum_i W_oi (x) x_i + b_o``.

    ``x`` is blocked on its last axis ``(..., 4I)``, ``weight`` has shape ``(4, O, I)``.
    Every quaternion pair is multiplied with :func:`hamilton_product`; only for tests.
    """
    xq = to_explicit(x, -1)  # (..., I, 4)
    wq = weight.movedim(0, -1)  # (O, I, 4)
    prod = hamilton_product(wq, xq.unsqueeze(-3))  # (..., O, I, 4)
    y = to_blocked(prod.sum(-2), -1)
    return y if bias is None else y + bias


def _product_table() -> list[tuple[int, int, int, float]]:
    """(out, left, right, sign) with ``(p q)_out = sum sign * p_left * q_right``, read off
    :func:`hamilton_product` applied to the basis quaternions."""
    basis = torch.eye(4, dtype=torch.float64)
    table = []
    for a in range(4):
        for b in range(4):
            prod = hamilton_product(basis[a], basis[b])
            out = int(prod.abs().argmax())
            table.append((out, a, b, float(prod[out])))
    return table


def reference_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    transposed: bool = False,
    output_padding: int | tuple[int, ...] = 0,
) -> Tensor:
    """Slow quaternion convolution: 16 real convolutions, one per component pair, summed
    with the signs of the Hamilton product table. ``weight`` is ``(4, O, I/g, *k)``
    (``(4, I, O/g, *k)`` when ``transposed``); ``x`` is blocked on dim 1. Only for tests."""
    nd = x.dim() - 2

    def tup(v: int | tuple[int, ...]) -> list[int]:
        return list(v) if isinstance(v, tuple | list) else [v] * nd

    xs = x.chunk(4, dim=1)
    outs: list[Tensor | None] = [None] * 4
    for out, left, right, sign in _product_table():
        y = torch.convolution(
            xs[right],
            weight[left],
            None,
            tup(stride),
            tup(padding),
            tup(dilation),
            transposed,
            tup(output_padding),
            groups,
        )
        outs[out] = sign * y if outs[out] is None else outs[out] + sign * y
    y = torch.cat(outs, dim=1)  # type: ignore[arg-type]
    return y if bias is None else y + bias.view(1, -1, *([1] * nd))
