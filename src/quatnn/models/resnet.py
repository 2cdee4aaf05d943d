"""Residual networks (He et al. 2016): CIFAR ResNet-20/56 and ImageNet ResNet-18/34/50/101/152.

Every residual branch ends in a batch norm; shortcuts are the identity, or a 1x1
convolution and a batch norm (projection) where the shape changes, also in the CIFAR
networks: He et al.'s option B, as in Frankle & Carbin's lottery code (their ResNet-20:
"271K" parameters), where He et al.'s CIFAR table used zero-padded identity shortcuts
(option A: ResNet-20 real3 would have 269,722 parameters, not 272,474). The bottleneck block
strides in its 3x3 convolution (as torchvision's ResNet-50 does). With
``small_input=True`` (default, for 32x32 images) the stem is a 3x3 convolution of stride 1
without max pool; with ``False`` it is the ImageNet stem (7x7 stride 2, 3x3 max pool
stride 2).

Example:
    >>> import torch
    >>> model = resnet("resnet20", "quaternion", 10, 4, (32, 32), norm="real")
    >>> model(torch.randn(2, 4, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quatnn.models.layers import Layers, zero_norm_

__all__ = ["ARCHITECTURES", "ResidualBlock", "ResNet", "resnet"]

ARCHITECTURES: dict[str, tuple[bool, tuple[int, ...], tuple[int, ...]]] = {
    "resnet20": (False, (16, 32, 64), (3, 3, 3)),
    "resnet56": (False, (16, 32, 64), (9, 9, 9)),
    "resnet18": (False, (64, 128, 256, 512), (2, 2, 2, 2)),
    "resnet34": (False, (64, 128, 256, 512), (3, 4, 6, 3)),
    "resnet50": (True, (64, 128, 256, 512), (3, 4, 6, 3)),
    "resnet101": (True, (64, 128, 256, 512), (3, 4, 23, 3)),
    "resnet152": (True, (64, 128, 256, 512), (3, 8, 36, 3)),
}
"""Name -> (bottleneck blocks, stage widths in real channels, blocks per stage)."""


class ResidualBlock(nn.Module):
    """``relu(residual(x) + shortcut(x))``: a basic block (two 3x3 convolutions) or a
    bottleneck (1x1, 3x3, 1x1 with 4x expansion), built by ``layers``."""

    def __init__(
        self, layers: Layers, in_channels: int, width: int, stride: int, bottleneck: bool
    ) -> None:
        super().__init__()
        out = 4 * width if bottleneck else width
        if bottleneck:
            self.residual = nn.Sequential(
                *layers.conv_norm_act(in_channels, width, 1),
                *layers.conv_norm_act(width, width, 3, stride, 1),
                *layers.conv_norm_act(width, out, 1, activation=None),
            )
        else:
            self.residual = nn.Sequential(
                *layers.conv_norm_act(in_channels, width, 3, stride, 1),
                *layers.conv_norm_act(width, out, 3, 1, 1, activation=None),
            )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out:
            self.shortcut = layers.conv_norm_act(in_channels, out, 1, stride, activation=None)
        self.out_channels = out

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.residual(x) + self.shortcut(x))


class ResNet(nn.Module):
    """``stem``, ``stages``, global average pool and the real ``head`` on the last
    stage's channels (see :func:`resnet` for the arguments)."""

    def __init__(
        self,
        layers: Layers,
        first: Layers,
        bottleneck: bool,
        widths: tuple[int, ...],
        blocks: tuple[int, ...],
        num_classes: int,
        in_channels: int,
        small_input: bool,
    ) -> None:
        super().__init__()
        if small_input:
            self.stem = first.conv_norm_act(in_channels, widths[0], 3, 1, 1, norm=layers)
        else:
            self.stem = nn.Sequential(
                *first.conv_norm_act(in_channels, widths[0], 7, 2, 3, norm=layers),
                layers.max_pool(3, 2, 1),
            )
        stages = []
        channels = widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            stage = []
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                stage.append(ResidualBlock(layers, channels, width, stride, bottleneck))
                channels = stage[-1].out_channels
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.stages(self.stem(x))).flatten(1))


def resnet(
    name: str,
    variant: str,
    num_classes: int,
    in_channels: int,
    input_size: tuple[int, int],
    *,
    small_input: bool = True,
    norm: str = "whiten",
    zero_init_residual: bool = False,
    quaternion_first: bool = True,
) -> ResNet:
    """The ResNet ``name`` (a key of :data:`ARCHITECTURES`).

    Args:
        small_input: 3x3 stride-1 stem without max pool (32x32 images); else ImageNet stem.
        norm: quaternion variant's batch norm (:data:`quatnn.models.layers.NORMS`); real
            variants always use ``nn.BatchNorm2d``.
        zero_init_residual: start the last batch norm of every residual branch at scale
            zero, so every block starts as the identity.
        quaternion_first: in the quaternion variant, make the stem convolution quaternion
            (``False``: real, e.g. to read 3 RGB channels).

    ``input_size`` does not change the network (global average pooling).
    """
    bottleneck, widths, blocks = ARCHITECTURES[name]
    layers = Layers.for_variant(variant, norm)
    first = layers.first(quaternion_first)
    model = ResNet(layers, first, bottleneck, widths, blocks, num_classes, in_channels, small_input)
    if zero_init_residual:
        for module in model.modules():
            if isinstance(module, ResidualBlock):
                zero_norm_(module.residual[-1])
    return model
