"""Conv-2, Conv-4 and Conv-6: the VGG-like CIFAR networks of Frankle & Carbin (2019).

Pairs of 3x3 convolutions (padding 1, bias, ReLU) of widths 64, 128, 256, each pair
followed by a 2x2 max pool, then fully connected 256-256-``num_classes``; no batch norm,
no dropout. The quaternion variant pools with :class:`~quatnn.nn.QMaxPool2d`, which keeps
the whole quaternion of largest norm in each window: a real max pool on the blocked tensor
would assemble r, i, j, k from different pixels into a quaternion that exists nowhere in
the input. Pooling has no parameters, so the published parameter counts are unaffected.

The published quaternion counts (Iqbal & Mishra 2023) imply a quaternion first convolution
reading 4 channels and a real output layer; e.g. Conv-2 on CIFAR-10: 640 + 9,280 (convs) +
1,048,832 + 16,640 (quaternion FC) + 2,570 (real head) = 1,077,962.

Example:
    >>> import torch
    >>> model = convnet(2, "quaternion", 10, in_channels=4, input_size=(32, 32))
    >>> model(torch.randn(2, 4, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from quatnn.models.layers import Layers

__all__ = ["convnet"]

WIDTHS = (64, 128, 256)
"""Width of the convolution pairs, in real channels; Conv-2k uses the first k//2."""


def convnet(
    depth: int,
    variant: str,
    num_classes: int,
    in_channels: int,
    input_size: tuple[int, int],
    *,
    quaternion_first: bool = True,
) -> nn.Sequential:
    """Conv-``depth`` (2, 4 or 6 convolutions) as ``features``, ``flatten``,
    ``classifier`` and the real ``head``; ``quaternion_first=False`` makes the first
    convolution real in the quaternion variant (so it can read 3 channels)."""
    if depth not in (2, 4, 6):
        raise ValueError(f"Conv-N depth must be 2, 4 or 6, got {depth}")
    pools = depth // 2
    height, width = (size >> pools for size in input_size)
    if height < 1 or width < 1:
        raise ValueError(
            f"conv{depth}: input_size {tuple(input_size)} is too small for {pools} 2x2 "
            f"max pools; each side must be at least {2**pools}"
        )
    layers = Layers.for_variant(variant)
    features: list[nn.Module] = []
    channels = in_channels
    for out in WIDTHS[:pools]:
        for _ in range(2):
            factory = layers.first(quaternion_first) if not features else layers
            features += [factory.conv(channels, out, 3, padding=1), nn.ReLU()]
            channels = out
        features.append(layers.max_pool(2))
    classifier = nn.Sequential(
        layers.linear(channels * height * width, 256),
        nn.ReLU(),
        layers.linear(256, 256),
        nn.ReLU(),
    )
    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(*features),
            flatten=nn.Flatten(),
            classifier=classifier,
            head=nn.Linear(256, num_classes),
        )
    )
