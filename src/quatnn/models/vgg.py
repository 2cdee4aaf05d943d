"""VGG-11/13/16/19 (Simonyan & Zisserman 2015, configurations A, B, D, E) with batch norm,
in the CIFAR form that Frankle & Carbin (2019, Figure 2) prune: the 3x3 convolution stack
of the ImageNet networks (stride 1, padding 1, each followed by a batch norm and ReLU) with
a 2x2 max pool after each of the first four stages, then the last stage's map averaged
(global average pooling: 2x2 at 32x32) into one real ``nn.Linear`` head on its 512
channels instead of the 4096-wide classifier. The pools round up (``ceil_mode``: an odd
side keeps its last row or column), which changes nothing for sides that are multiples of
16 and lets 28x28 digits through (28, 14, 7, 4, 2).

The convolutions have no bias (the batch norm after each has one; torchvision's and
Frankle & Carbin's have one, which the norm's shift makes redundant). The quaternion
variant pools with :class:`~quatnn.nn.QMaxPool2d`, which keeps whole quaternions.

Example:
    >>> import torch
    >>> model = vgg("vgg11", "quaternion", 10, 4, (32, 32), norm="real")
    >>> model(torch.randn(2, 4, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from quatnn.models.layers import Layers

__all__ = ["CONFIGS", "vgg"]

CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}
"""Name -> the convolution widths (real channels) of each stage; a max pool ends each but
the last."""


def vgg(
    name: str,
    variant: str,
    num_classes: int,
    in_channels: int,
    input_size: tuple[int, int],
    *,
    norm: str = "whiten",
    quaternion_first: bool = True,
) -> nn.Sequential:
    """The VGG ``name`` (a key of :data:`CONFIGS`) as ``features``, ``pool``,
    ``flatten`` and the real ``head``.

    Args:
        norm: quaternion variant's batch norm (:data:`quatnn.models.layers.NORMS`); real
            variants always use ``nn.BatchNorm2d``.
        quaternion_first: in the quaternion variant, make the first convolution quaternion
            (``False``: real, e.g. to read 3 RGB channels).

    ``input_size`` does not change the network (global average pooling).
    """
    stages = CONFIGS[name]
    layers = Layers.for_variant(variant, norm)
    features: list[nn.Module] = []
    channels = in_channels
    for i, widths in enumerate(stages):
        if i:
            features.append(layers.max_pool(2, ceil_mode=True))
        for width in widths:
            factory = layers.first(quaternion_first) if not features else layers
            features += factory.conv_norm_act(channels, width, 3, padding=1, norm=layers)
            channels = width
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(*features),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            head=nn.Linear(channels, num_classes),
        )
    )
