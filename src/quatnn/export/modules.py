"""The small plain-torch modules a folded model is made of (all export to ONNX, TorchScript
and ``torch.export``): fixed channel permutations around grouped convolutions, the per
quaternion channel 4x4 affine map of a whitening batch norm, and a norm-based adaptive max
pool built from gathers.

Example:
    >>> import torch
    >>> perm = ChannelPermute(torch.tensor([2, 0, 1]))
    >>> perm(torch.arange(3.0).view(1, 3)).tolist()
    [[2.0, 0.0, 1.0]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["ChannelPermute", "PermutedConv", "QuaternionAffine", "NormAdaptiveMaxPool"]


class ChannelPermute(nn.Module):
    """``y[:, j] = x[:, index[j]]`` (one ``index_select`` on dim 1, ONNX ``Gather``)."""

    index: Tensor

    def __init__(self, index: Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.to(torch.long).clone())

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"channels={self.index.numel()}"


class PermutedConv(nn.Module):
    """A real grouped (transposed) convolution between two channel permutations.

    A quaternion convolution with ``groups > 1`` folds into a real grouped convolution whose
    channels are group-major ``(group, component, channel)`` while the model's tensors are
    component-blocked (:func:`quatnn.functional.block_weight`), so the input is permuted to
    group-major and the output back. ``output_index[i]`` is the real output channel of
    blocked channel ``i`` (the bias of ``conv`` is stored in the group-major order).
    """

    def __init__(self, conv: nn.Module, input_index: Tensor, output_index: Tensor) -> None:
        super().__init__()
        self.permute_in = ChannelPermute(input_index)
        self.conv = conv
        self.permute_out = ChannelPermute(output_index)

    def forward(self, x: Tensor) -> Tensor:
        return self.permute_out(self.conv(self.permute_in(x)))


class QuaternionAffine(nn.Module):
    """``y_c = M_c q_c + t_c`` for every quaternion channel ``c`` of a blocked tensor
    ``(N, 4C, *spatial)``: the eval-mode whitening batch norm with its statistics folded in.

    ``matrix`` is ``(C, 4, 4)`` (row: output component), ``shift`` blocked ``(4C,)``. The
    forward is 4 broadcast multiply-adds on the ``(N, 4, C, ...)`` view: no einsum, no
    matmul on tiny matrices, only ``Reshape``/``Slice``/``Mul``/``Add`` in ONNX.
    """

    columns: Tensor
    shift: Tensor

    def __init__(self, matrix: Tensor, shift: Tensor) -> None:
        super().__init__()
        c = matrix.shape[0]
        if matrix.shape != (c, 4, 4) or shift.shape != (4 * c,):
            raise ValueError(
                f"QuaternionAffine: expected matrix (C, 4, 4) and shift (4C,), got "
                f"{tuple(matrix.shape)} and {tuple(shift.shape)}"
            )
        self.num_quaternions = c
        # columns[b, a, c] = M_c[a, b]: the factor of input component b in output component a
        self.register_buffer("columns", matrix.permute(2, 1, 0).contiguous())
        self.register_buffer("shift", shift.view(4, c).clone())

    def forward(self, x: Tensor) -> Tensor:
        c = self.num_quaternions
        ones = [1] * (x.dim() - 2)
        q = x.unflatten(1, (4, c))  # (N, 4, C, *spatial)
        y = self.shift.view(1, 4, c, *ones) + q[:, 0:1] * self.columns[0].view(1, 4, c, *ones)
        for b in range(1, 4):
            y = y + q[:, b : b + 1] * self.columns[b].view(1, 4, c, *ones)
        return y.flatten(1, 2)

    def extra_repr(self) -> str:
        return f"{4 * self.num_quaternions}"


def _bins(size: int, out: int) -> tuple[list[int], int]:
    """Window starts and the widest window of adaptive pooling ``size -> out`` (the torch
    rule: bin ``i`` covers ``[floor(i size / out), ceil((i + 1) size / out))``); the index
    table is ``(out, width)`` with short windows padded by repeating their last index."""
    starts = [(i * size) // out for i in range(out)]
    ends = [-((-(i + 1) * size) // out) for i in range(out)]
    width = max(e - s for s, e in zip(starts, ends, strict=True))
    table = [[min(s + k, e - 1) for k in range(width)] for s, e in zip(starts, ends, strict=True)]
    return [i for row in table for i in row], width


class NormAdaptiveMaxPool(nn.Module):
    """Export-friendly :class:`quatnn.nn.QAdaptiveMaxPool2d` (and 1d/3d): keep the whole
    quaternion of largest norm in each adaptive window.

    ``F.adaptive_max_pool*d(return_indices=True)`` does not export to ONNX unless the output
    size divides the input size; this version gathers every window (index tables built from
    the input size, which is fixed in an exported graph, the batch stays dynamic), takes the
    first arg-max of the squared norms (the tie rule of the torch pool: the first maximum in
    row-major window order) and gathers the four components there.
    """

    def __init__(self, nd: int, output_size: int | Sequence[int | None]) -> None:
        super().__init__()
        self.nd = nd
        sizes = (output_size,) * nd if isinstance(output_size, int) else tuple(output_size)
        if len(sizes) != nd:
            raise ValueError(f"output_size must be an int or {nd} sizes, got {output_size}")
        self.output_size = sizes

    def forward(self, x: Tensor) -> Tensor:
        nd = self.nd
        if x.dim() != nd + 2 or x.shape[1] % 4:
            raise ValueError(
                f"expected an (N, 4C, *{nd} spatial) input with C quaternion channels, "
                f"got shape {tuple(x.shape)}"
            )
        spatial = [int(s) for s in x.shape[2:]]
        outs = [s if o is None else int(o) for s, o in zip(spatial, self.output_size, strict=True)]
        q = x.unflatten(1, (4, -1))  # (N, 4, C, *spatial)
        # position of every window element in the flattened spatial grid: (*outs, *widths)
        pos = torch.zeros((), dtype=torch.long, device=x.device)
        widths = []
        for d, (size, out) in enumerate(zip(spatial, outs, strict=True)):
            table, width = _bins(size, out)
            idx = torch.tensor(table, dtype=torch.long, device=x.device).view(out, width)
            stride = math.prod(spatial[d + 1 :])
            shape = [1] * (2 * nd)
            shape[d], shape[nd + d] = out, width
            pos = pos + (idx * stride).view(shape)
            widths.append(width)
        window = pos.reshape(-1)  # (*outs, *widths) in row-major order: P windows of W
        span = math.prod(widths)
        flat = q.flatten(3)  # (N, 4, C, L)
        norms = flat.square().sum(1)  # (N, C, L)
        candidates = norms.index_select(2, window).unflatten(2, (-1, span))
        best = candidates.argmax(-1, keepdim=True)  # (N, C, P, 1), first maximum
        chosen = window.view(-1, span).expand(norms.shape[0], norms.shape[1], -1, -1)
        picked = chosen.gather(3, best).squeeze(3)  # (N, C, P)
        out = flat.gather(3, picked.unsqueeze(1).expand(-1, 4, -1, -1))
        return out.reshape(x.shape[0], x.shape[1], *outs)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"
