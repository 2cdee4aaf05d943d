"""One factory per variant, so every architecture is written once for all variants.

:class:`Layers` hands out the real (``torch.nn``) or quaternion (:mod:`quatnn.nn`) layer
for a role: convolution, depthwise convolution, linear map, batch norm, max pooling, layer
norm, dropout of tokens, Transformer encoder layer.
Channel counts are real units in both cases, so the same architecture code gives the same
tensor shapes for every variant.

Example:
    >>> import torch
    >>> q = Layers.for_variant("quaternion", norm="variance")
    >>> block = q.conv_norm_act(4, 16, 3, padding=1)
    >>> type(block[0]).__name__, type(block[1]).__name__
    ('QConv2d', 'QBatchNorm2d')
    >>> block(torch.randn(2, 4, 8, 8)).shape
    torch.Size([2, 16, 8, 8])
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from quatnn.nn import QConv2d, QDropout, QLayerNorm, QLinear, QMaxPool2d
from quatnn.nn.attention import QTransformerEncoderLayer, TransformerEncoderLayer

__all__ = ["NORMS", "VARIANTS", "Layers", "check_positive", "round_channels", "zero_norm_"]

VARIANTS = ("real3", "real4", "real", "quaternion")
"""Model variants: real layers reading 3, 4 or 1 input channels, and quaternion layers."""

NORMS = ("whiten", "variance", "split", "real")
"""Norms of the quaternion variant: a :class:`quatnn.nn.norm.QBatchNorm2d` mode, or
``"real"`` for ``nn.BatchNorm2d`` on the 4C real channels."""


@dataclass(frozen=True)
class Layers:
    """Layer constructors of one variant.

    Args:
        quaternion: build quatnn quaternion layers (else ``torch.nn`` layers).
        norm: quaternion variant only: the norm (one of :data:`NORMS`); real layers always
            use ``nn.BatchNorm2d``.
    """

    quaternion: bool
    norm: str = "real"

    @classmethod
    def for_variant(cls, variant: str, norm: str = "real") -> Layers:
        """The factory of ``variant`` (one of :data:`VARIANTS`); ``norm`` is checked always
        and used by the quaternion variant only."""
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
        return cls(variant == "quaternion", norm)

    def first(self, quaternion_first: bool) -> Layers:
        """The factory of a model's first weighted layer: this one, or a real one when
        ``quaternion_first`` is False (so a quaternion model can read e.g. 3 RGB channels)."""
        return self if quaternion_first else replace(self, quaternion=False)

    def conv(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
    ) -> nn.Module:
        """``nn.Conv2d`` or :class:`~quatnn.nn.QConv2d` (channels in real units)."""
        cls = QConv2d if self.quaternion else nn.Conv2d
        return cls(in_channels, out_channels, kernel_size, stride, padding, bias=bias)

    def depthwise(
        self, channels: int, kernel_size: int, stride: int = 1, padding: int = 0
    ) -> nn.Module:
        """Depthwise convolution without bias: every real channel on its own
        (``groups=channels``), or every quaternion channel on its own (``groups=channels//4``:
        each output quaternion is one quaternion kernel applied to one input quaternion)."""
        if self.quaternion:
            return QConv2d(
                channels, channels, kernel_size, stride, padding, groups=channels // 4, bias=False
            )
        return nn.Conv2d(
            channels, channels, kernel_size, stride, padding, groups=channels, bias=False
        )

    def linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        """``nn.Linear`` or :class:`~quatnn.nn.QLinear` (features in real units)."""
        cls = QLinear if self.quaternion else nn.Linear
        return cls(in_features, out_features, bias=bias)

    def batch_norm(self, channels: int) -> nn.Module:
        """``nn.BatchNorm2d``, or ``QBatchNorm2d(channels, mode=norm)`` for a quaternion
        factory whose norm is not ``"real"``."""
        if not self.quaternion or self.norm == "real":
            return nn.BatchNorm2d(channels)
        from quatnn.nn.norm import QBatchNorm2d

        return QBatchNorm2d(channels, mode=self.norm)

    def max_pool(
        self, kernel_size: int, stride: int | None = None, padding: int = 0, ceil_mode: bool = False
    ) -> nn.Module:
        """``nn.MaxPool2d``, or the norm-based :class:`~quatnn.nn.QMaxPool2d` that keeps
        whole quaternions (a real max pool would mix components from different pixels)."""
        cls = QMaxPool2d if self.quaternion else nn.MaxPool2d
        return cls(kernel_size, stride, padding, ceil_mode=ceil_mode)

    def layer_norm(self, features: int) -> nn.Module:
        """``nn.LayerNorm`` or :class:`~quatnn.nn.QLayerNorm` over the last axis."""
        return (QLayerNorm if self.quaternion else nn.LayerNorm)(features)

    def dropout(self, p: float) -> nn.Module:
        """``nn.Dropout``, or :class:`~quatnn.nn.QDropout` of whole quaternions on the last
        (token feature) axis."""
        return QDropout(p, dim=-1) if self.quaternion else nn.Dropout(p)

    def encoder_layer(self, dim: int, heads: int, mlp_dim: int, dropout: float) -> nn.Module:
        """A pre-norm Transformer encoder layer with GELU on batch-first tokens:
        :class:`~quatnn.nn.attention.TransformerEncoderLayer` (torch's, with
        ``nn.Linear`` projections) or its quaternion form
        :class:`~quatnn.nn.attention.QTransformerEncoderLayer`."""
        cls = QTransformerEncoderLayer if self.quaternion else TransformerEncoderLayer
        return cls(dim, heads, mlp_dim, dropout, "gelu", batch_first=True, norm_first=True)

    def conv_norm_act(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        activation: type[nn.Module] | None = nn.ReLU,
        norm: Layers | None = None,
    ) -> nn.Sequential:
        """Bias-free convolution, batch norm (from ``norm``, default this factory) and an
        optional split (component-wise) activation."""
        layers = [
            self.conv(in_channels, out_channels, kernel_size, stride, padding, bias=False),
            (norm or self).batch_norm(out_channels),
        ]
        if activation is not None:
            layers.append(activation())
        return nn.Sequential(*layers)


def check_positive(value: object, what: str) -> None:
    """ValueError naming ``what`` unless ``value`` is a positive int (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def round_channels(channels: float, divisor: int = 8) -> int:
    """``channels`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``),
    rounded up once more if that lost over 10 % (the MobileNet width rule).

    >>> round_channels(32 * 0.75), round_channels(24 * 0.35)
    (24, 8)
    """
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def zero_norm_(norm: nn.Module) -> None:
    """Zero the scale of a batch norm (real or quaternion), so that a residual branch
    ending in it starts as zero and its block as the identity."""
    nn.init.zeros_(norm.weight)
