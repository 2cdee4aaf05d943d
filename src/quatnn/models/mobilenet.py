"""MobileNet v1 (Howard et al. 2017) and v2 (Sandler et al. 2018).

Depthwise separable convolutions: a depthwise 3x3 convolution then a pointwise 1x1
convolution. In the quaternion variant the depthwise convolution is quaternion depthwise
(``groups = channels // 4``: one quaternion kernel per quaternion channel, mixing the four
components of that channel only) and the pointwise one a quaternion 1x1 convolution.
A quaternion depthwise kernel holds 4 reals per quaternion channel per tap, exactly as many
as the real depthwise kernels of its 4 real channels, so depthwise layers do not shrink:
quaternion MobileNets keep a little more than 1/4 of the real parameters.

With ``small_input=True`` (default, 32x32 images) the first convolution has stride 1,
otherwise stride 2 (ImageNet). Channel counts are ``width_mult`` times the published
ones, rounded to multiples of 8 (so they stay divisible by 4).

Example:
    >>> import torch
    >>> model = mobilenet_v2("quaternion", 10, 4, (32, 32), width_mult=0.25, norm="real")
    >>> model(torch.randn(2, 4, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from torch import Tensor, nn

from quatnn.models.layers import Layers, round_channels

__all__ = ["InvertedResidual", "MobileNet", "mobilenet_v1", "mobilenet_v2"]

V1_BLOCKS = (
    ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2))
    + ((512, 1),) * 5
    + ((1024, 2), (1024, 1))
)
"""MobileNet v1 separable blocks after the 32-channel stem: (output channels, stride)."""

V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
"""MobileNet v2 stages: (expansion, output channels, blocks, stride of the first block)."""


class InvertedResidual(nn.Module):
    """MobileNet v2 block: 1x1 expansion (skipped when ``expansion == 1``), depthwise 3x3,
    linear 1x1 projection; the input is added back when the shapes agree."""

    def __init__(
        self, layers: Layers, in_channels: int, out_channels: int, stride: int, expansion: int
    ) -> None:
        super().__init__()
        hidden = in_channels * expansion
        body: list[nn.Module] = []
        if expansion != 1:
            body += layers.conv_norm_act(in_channels, hidden, 1, activation=nn.ReLU6)
        body += [layers.depthwise(hidden, 3, stride, 1), layers.batch_norm(hidden), nn.ReLU6()]
        body += layers.conv_norm_act(hidden, out_channels, 1, activation=None)
        self.body = nn.Sequential(*body)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) if self.use_residual else self.body(x)


class MobileNet(nn.Module):
    """``features``, global average pool and the real ``head``."""

    def __init__(self, features: nn.Sequential, channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def _separable(layers: Layers, in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        layers.depthwise(in_channels, 3, stride, 1),
        layers.batch_norm(in_channels),
        nn.ReLU(),
        *layers.conv_norm_act(in_channels, out_channels, 1),
    )


def mobilenet_v1(
    variant: str,
    num_classes: int,
    in_channels: int,
    input_size: tuple[int, int],
    *,
    width_mult: float = 1.0,
    small_input: bool = True,
    norm: str = "whiten",
    quaternion_first: bool = True,
) -> MobileNet:
    """MobileNet v1 with ReLU. ``norm`` and ``quaternion_first`` as in
    :func:`quatnn.models.resnet.resnet`; ``input_size`` does not change the network."""
    if width_mult <= 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    layers = Layers.for_variant(variant, norm)
    channels = round_channels(32 * width_mult)
    stem = layers.first(quaternion_first)
    features = [
        stem.conv_norm_act(in_channels, channels, 3, 1 if small_input else 2, 1, norm=layers)
    ]
    for out, block_stride in V1_BLOCKS:
        out = round_channels(out * width_mult)
        features.append(_separable(layers, channels, out, block_stride))
        channels = out
    return MobileNet(nn.Sequential(*features), channels, num_classes)


def mobilenet_v2(
    variant: str,
    num_classes: int,
    in_channels: int,
    input_size: tuple[int, int],
    *,
    width_mult: float = 1.0,
    small_input: bool = True,
    norm: str = "whiten",
    quaternion_first: bool = True,
) -> MobileNet:
    """MobileNet v2 with ReLU6; the last 1x1 convolution has 1280 channels (scaled only
    when ``width_mult > 1``). Options as in :func:`mobilenet_v1`."""
    if width_mult <= 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    layers = Layers.for_variant(variant, norm)
    channels = round_channels(32 * width_mult)
    stem = layers.first(quaternion_first)
    features: list[nn.Module] = [
        stem.conv_norm_act(in_channels, channels, 3, 1 if small_input else 2, 1, nn.ReLU6, layers)
    ]
    for expansion, out, count, first_stride in V2_STAGES:
        out = round_channels(out * width_mult)
        for block in range(count):
            stride = first_stride if block == 0 else 1
            features.append(InvertedResidual(layers, channels, out, stride, expansion))
            channels = out
    last = round_channels(1280 * max(1.0, width_mult))
    features.append(layers.conv_norm_act(channels, last, 1, activation=nn.ReLU6))
    return MobileNet(nn.Sequential(*features), last, num_classes)
