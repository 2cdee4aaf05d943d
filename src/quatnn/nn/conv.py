"""Quaternion convolutions, 1d/2d/3d and transposed, from one N-d implementation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quatnn import functional as QF
from quatnn.nn.base import QuaternionLayer, quaternion_units

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class _QConvNd(QuaternionLayer):
    """N-d quaternion (transposed) convolution; subclasses fix ``_nd`` and ``_transposed``.

    Arguments follow ``torch.nn.Conv{N}d`` / ``ConvTranspose{N}d`` with channel counts in
    real units (multiples of 4) and ``groups`` dividing the *quaternion* channel counts, so
    ``groups = in_channels // 4`` is a quaternion depthwise convolution. ``weight`` has shape
    ``(4, out/4, in/4/groups, *kernel)`` (transposed: ``(4, in/4, out/4/groups, *kernel)``,
    the torch order). Extra arguments: ``algorithm``, ``init_criterion``, ``fold_cache`` as in
    :class:`quatnn.nn.QLinear`.
    """

    _nd: int
    _transposed: bool = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        output_padding: int | Sequence[int] = 0,
        algorithm: str = "auto",
        init_criterion: str = "he",
        fold_cache: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        q_in = quaternion_units(name, "in_channels", in_channels)
        q_out = quaternion_units(name, "out_channels", out_channels)
        if not isinstance(groups, int) or groups < 1 or q_in % groups or q_out % groups:
            raise ValueError(
                f"{name}: groups must divide the quaternion channel counts "
                f"(in_channels/4={q_in}, out_channels/4={q_out}), got groups={groups}"
            )
        if padding_mode not in _PADDING_MODES:
            raise ValueError(
                f"{name}: padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}"
            )
        if self._transposed and (padding_mode != "zeros" or isinstance(padding, str)):
            raise ValueError(f"{name}: only padding_mode='zeros' and numeric padding are supported")
        if not self._transposed and any(QF._tuple(output_padding, self._nd, "output_padding")):
            raise ValueError(f"{name}: output_padding applies to transposed convolutions only")
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ValueError(
                f"{name}: padding must be an int, a tuple, 'same' or 'valid', got {padding!r}"
            )
        nd = self._nd
        self.in_channels, self.out_channels, self.groups = 4 * q_in, 4 * q_out, groups
        self.kernel_size = QF._tuple(kernel_size, nd, "kernel_size", 1)
        self.stride = QF._tuple(stride, nd, "stride", 1)
        self.dilation = QF._tuple(dilation, nd, "dilation", 1)
        self.padding = padding if isinstance(padding, str) else QF._tuple(padding, nd, "padding")
        self.output_padding = QF._tuple(output_padding, nd, "output_padding")
        if padding == "same" and any(s != 1 for s in self.stride):
            raise ValueError(f"{name}: padding='same' needs stride 1, got stride={self.stride}")
        self.padding_mode = padding_mode
        self.algorithm, self.init_criterion, self.fold_cache = algorithm, init_criterion, fold_cache
        self._check_options()
        shape = (q_in, q_out // groups) if self._transposed else (q_out, q_in // groups)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(4, *shape, *self.kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        self.reset_parameters()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (torch's signature)
        """Apply conversions to the weight ``(4, O, I, *kernel)`` through its stacked
        components ``(4O, I, *kernel)``, a real convolution's weight, so that
        ``module.to(memory_format=...)`` treats it as ``torch.nn.Conv{N}d`` treats its weight:
        channels_last for 2-d kernels, channels_last_3d for 3-d ones, 1-d left alone and a
        format of the other rank refused."""
        rank = self.weight.dim()

        def per_component(t: Tensor) -> Tensor:
            if t.dim() != rank:
                return fn(t)
            out = fn(t.flatten(0, 1)).unflatten(0, (4, -1))
            # Contiguous after a format change (1x1 kernels), it keeps plain strides: the
            # gradients get those, and DDP's buckets want the parameter's (else a warning).
            plain = torch.empty(out.shape, device="meta").stride()
            odd = out.is_contiguous() and out.stride() != plain
            return out.clone(memory_format=torch.contiguous_format) if odd else out

        return super()._apply(per_component, recurse)

    def _fans(self) -> tuple[int, int]:
        kernel = math.prod(self.kernel_size)
        q_in, q_out = self.in_channels // 4, self.out_channels // 4
        return q_in // self.groups * kernel, q_out // self.groups * kernel

    def _fold(self) -> Tensor:
        return QF.block_weight(self.weight, self.groups, self._transposed)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv(x, self.output_padding)

    def _conv(self, x: Tensor, output_padding: tuple[int, ...]) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            if padding == "same":
                pairs = QF.same_padding(self.kernel_size, self.dilation)
            else:
                pairs = [(0, 0)] * self._nd if padding == "valid" else [(p, p) for p in padding]
            x = F.pad(x, [p for pair in reversed(pairs) for p in pair], mode=self.padding_mode)
            padding = 0
        return QF.quaternion_conv(
            x,
            self.weight,
            self.bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            transposed=self._transposed,
            output_padding=output_padding,
            algorithm=self.algorithm,
            folded=self.folded_weight,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if any(p != 0 for p in self.output_padding):
            s += f", output_padding={self.output_padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return f"{s}, {self._options_repr()}"


class QConv1d(_QConvNd):
    """Quaternion ``nn.Conv1d``. Example: ``QConv1d(8, 16, 3)(torch.randn(2, 8, 10))``."""

    _nd = 1


class QConv2d(_QConvNd):
    """Quaternion ``nn.Conv2d``.

    Example:
        >>> QConv2d(4, 16, 3, padding=1)(torch.randn(2, 4, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
    """

    _nd = 2


class QConv3d(_QConvNd):
    """Quaternion ``nn.Conv3d``. Example: ``QConv3d(4, 8, 3)(torch.randn(1, 4, 5, 5, 5))``."""

    _nd = 3


class _QConvTransposeNd(_QConvNd):
    """Transposed base: the positional order of ``torch.nn.ConvTranspose{N}d``, and its
    ``forward(x, output_size=None)``."""

    _transposed = True

    def forward(self, x: Tensor, output_size: Sequence[int] | None = None) -> Tensor:
        """``output_size`` (the spatial size, optionally after batch and channels) picks
        the output padding, as in ``torch.nn.ConvTranspose{N}d``."""
        if output_size is None:
            return self._conv(x, self.output_padding)
        size, nd = list(output_size)[-self._nd :], self._nd
        if len(output_size) not in (nd, x.dim()) or x.dim() not in (nd + 1, nd + 2):
            raise ValueError(
                f"{type(self).__name__}: output_size must have {nd} or {x.dim()} entries for "
                f"a {x.dim()}-d input, got {list(output_size)} for shape {tuple(x.shape)}"
            )
        pads = []
        for d in range(nd):
            stride, dilation = self.stride[d], self.dilation[d]
            least = (x.shape[x.dim() - nd + d] - 1) * stride - 2 * self.padding[d]
            least += dilation * (self.kernel_size[d] - 1) + 1
            if not least <= size[d] < least + max(stride, dilation):
                raise ValueError(
                    f"{type(self).__name__}: output_size {size} cannot be reached: dimension "
                    f"{d} must be between {least} and {least + max(stride, dilation) - 1}"
                )
            pads.append(size[d] - least)
        return self._conv(x, tuple(pads))

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        output_padding: int | Sequence[int] = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: int | Sequence[int] = 1,
        padding_mode: str = "zeros",
        **kwargs,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            output_padding=output_padding,
            **kwargs,
        )


class QConvTranspose1d(_QConvTransposeNd):
    """Quaternion ``nn.ConvTranspose1d`` (``output_padding``, ``groups`` supported)."""

    _nd = 1


class QConvTranspose2d(_QConvTransposeNd):
    """Quaternion ``nn.ConvTranspose2d``.

    Example:
        >>> QConvTranspose2d(8, 4, 3, stride=2, output_padding=1)(torch.randn(1, 8, 4, 4)).shape
        torch.Size([1, 4, 10, 10])
    """

    _nd = 2


class QConvTranspose3d(_QConvTransposeNd):
    """Quaternion ``nn.ConvTranspose3d``."""

    _nd = 3
