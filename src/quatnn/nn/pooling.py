"""Quaternion max pooling: keep the whole quaternion with the largest norm in each window.

(Real max pooling on a blocked tensor would pick r, i, j, k from different positions and
build a quaternion that exists nowhere in the input.) With ``return_indices=True`` the
pools also return where each kept quaternion was, in the form ``torch.nn.MaxUnpool{N}d``
takes, so an unpooling puts whole quaternions back in place.

Example:
    >>> import torch
    >>> x = torch.randn(1, 8, 4, 4)
    >>> y, where = QMaxPool2d(2, return_indices=True)(x)
    >>> back = torch.nn.MaxUnpool2d(2)(y, where)  # the kept quaternions, zeros elsewhere
    >>> bool(((back == x) | (back == 0)).all())
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from quatnn.functional import _memory_format


def _pick_by_norm(
    x: Tensor, pool: Callable[[Tensor], tuple[Tensor, Tensor]], nd: int, return_indices: bool
) -> Tensor | tuple[Tensor, Tensor]:
    """Pool the squared norms with ``pool`` (returning indices) and gather every component
    at the winning positions; with ``return_indices``, also those positions for each
    component ``(N, 4C, *out)``. Unbatched inputs and channels_last layouts as torch's."""
    if x.dim() == nd + 1 and x.shape[0] % 4 == 0:  # unbatched (4C, *spatial)
        picked = _pick_by_norm(x.unsqueeze(0), pool, nd, return_indices)
        return tuple(t.squeeze(0) for t in picked) if return_indices else picked.squeeze(0)
    if x.dim() != nd + 2 or x.shape[1] % 4:
        raise ValueError(
            f"expected an (N, 4C, *{nd} spatial) or unbatched (4C, *{nd} spatial) input with "
            f"C quaternion channels, got shape {tuple(x.shape)}"
        )
    q = x.unflatten(1, (4, -1))  # (N, 4, C, *spatial)
    _, idx = pool(q.square().sum(1))  # (N, C, *out)
    flat = q.flatten(3)  # (N, 4, C, L)
    where = idx.flatten(2).unsqueeze(1).expand(-1, 4, -1, -1)
    layout = _memory_format(x)
    out = flat.gather(3, where).view(x.shape[0], x.shape[1], *idx.shape[2:])
    out = out.contiguous(memory_format=layout)
    if not return_indices:
        return out
    return out, where.reshape(out.shape).contiguous(memory_format=layout)


class _QMaxPoolNd(nn.Module):
    _nd: int

    def __init__(
        self,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        return_indices: bool = False,
        ceil_mode: bool = False,
    ) -> None:
        super().__init__()
        stride = kernel_size if stride is None else stride  # torch: None means kernel_size
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.return_indices, self.ceil_mode = dilation, return_indices, ceil_mode

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        pool = getattr(F, f"max_pool{self._nd}d")

        def norms(n: Tensor) -> tuple[Tensor, Tensor]:
            return pool(
                n,
                self.kernel_size,
                self.stride,
                self.padding,
                self.dilation,
                ceil_mode=self.ceil_mode,
                return_indices=True,
            )

        return _pick_by_norm(x, norms, self._nd, self.return_indices)

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, ceil_mode={self.ceil_mode}"
        )


class _QAdaptiveMaxPoolNd(nn.Module):
    _nd: int

    def __init__(
        self, output_size: int | Sequence[int | None], return_indices: bool = False
    ) -> None:
        super().__init__()
        self.output_size, self.return_indices = output_size, return_indices

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        pool = getattr(F, f"adaptive_max_pool{self._nd}d")

        def norms(n: Tensor) -> tuple[Tensor, Tensor]:
            return pool(n, self.output_size, return_indices=True)

        return _pick_by_norm(x, norms, self._nd, self.return_indices)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class QMaxPool1d(_QMaxPoolNd):
    """Norm-based quaternion ``nn.MaxPool1d``."""

    _nd = 1


class QMaxPool2d(_QMaxPoolNd):
    """Norm-based quaternion ``nn.MaxPool2d``.

    Example:
        >>> import torch
        >>> QMaxPool2d(2)(torch.randn(1, 8, 4, 4)).shape
        torch.Size([1, 8, 2, 2])
    """

    _nd = 2


class QMaxPool3d(_QMaxPoolNd):
    """Norm-based quaternion ``nn.MaxPool3d``."""

    _nd = 3


class QAdaptiveMaxPool1d(_QAdaptiveMaxPoolNd):
    """Norm-based quaternion ``nn.AdaptiveMaxPool1d``."""

    _nd = 1


class QAdaptiveMaxPool2d(_QAdaptiveMaxPoolNd):
    """Norm-based quaternion ``nn.AdaptiveMaxPool2d``.

    Example:
        >>> import torch
        >>> QAdaptiveMaxPool2d(1)(torch.randn(2, 8, 5, 5)).shape
        torch.Size([2, 8, 1, 1])
    """

    _nd = 2


class QAdaptiveMaxPool3d(_QAdaptiveMaxPoolNd):
    """Norm-based quaternion ``nn.AdaptiveMaxPool3d``."""

    _nd = 3
