"""Lenet-300-100, the fully connected MNIST network of the lottery-ticket experiments.

Example:
    >>> import torch
    >>> model = lenet_300_100("quaternion", 10, in_channels=1, input_size=(28, 28))
    >>> model(torch.randn(2, 784)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from quatnn.models.layers import Layers

__all__ = ["lenet_300_100"]


def lenet_300_100(
    variant: str,
    num_classes: int,
    in_channels: int,
    input_size: tuple[int, int],
    *,
    quaternion_first: bool = True,
) -> nn.Sequential:
    """``flatten -> 300 -> 100 -> num_classes`` with ReLU (LeCun et al. 1998; Frankle &
    Carbin 2019).

    Reads ``(N, F)`` or ``(N, C, H, W)`` (flattened) with ``F = in_channels * H * W``. In
    the quaternion variant the ``F`` reals are ``F/4`` quaternions in blocked layout:
    feed a grayscale image through the ``group4`` encoding (:mod:`quatnn.data.encodings`)
    to make 4 consecutive pixels one quaternion, as in Iqbal & Mishra (2023). The head
    (``head``) is a real ``nn.Linear``; ``quaternion_first=False`` also makes the first
    layer real.
    """
    layers = Layers.for_variant(variant)
    in_features = in_channels * input_size[0] * input_size[1]
    return nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc1=layers.first(quaternion_first).linear(in_features, 300),
            relu1=nn.ReLU(),
            fc2=layers.linear(300, 100),
            relu2=nn.ReLU(),
            head=nn.Linear(100, num_classes),
        )
    )
