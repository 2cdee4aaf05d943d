"""Input encodings: how an image becomes the real tensor a model reads.

Each encoding is a plain function of one tensor, so it can be the last step of a
``torchvision.transforms.Compose``. It takes one image ``(C, H, W)`` or a batch
``(N, C, H, W)``; the channel axis is always dim -3. Quaternion outputs use the
component-blocked layout of DESIGN.md: with one quaternion per pixel, the four output
channels are simply (r, i, j, k).

==============  ===========  ==========================================================
name            input        output
==============  ===========  ==========================================================
``identity``    any          the input, unchanged
``rgb_gray``    3 channels   [R, G, B, Y]: R is the real part
``gray_real``   3 channels   [Y, R, G, B]: gray is the real part
``pure``        3 channels   [0, R, G, B]: a pure quaternion, real part exactly 0
``gray_repeat`` 1 channel    [Y, Y, Y, Y]
``group4``      1 channel    flat vector of H*W reals: 4 consecutive pixels per quaternion
==============  ===========  ==========================================================

Y is the ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B of the tensor given (in
:func:`quatnn.data.load` that is the normalized image).

Example:
    >>> import torch
    >>> from quatnn.data import ENCODINGS
    >>> ENCODINGS["pure"](torch.ones(3, 2, 2))[:, 0, 0]
    tensor([0., 1., 1., 1.])
    >>> ENCODINGS["group4"](torch.arange(8.0).reshape(1, 2, 4))
    tensor([0., 4., 1., 5., 2., 6., 3., 7.])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

BT601 = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights for R, G, B."""


def _channels(x: Tensor, expected: int, encoding: str) -> tuple[Tensor, ...]:
    if x.dim() < 3 or x.shape[-3] != expected:
        raise ValueError(
            f"encoding {encoding!r} needs {expected} channel(s) on dim -3 of a (C,H,W) or "
            f"(N,C,H,W) tensor; got shape {tuple(x.shape)}"
        )
    return x.unbind(-3)


def _luma(r: Tensor, g: Tensor, b: Tensor) -> Tensor:
    return BT601[0] * r + BT601[1] * g + BT601[2] * b


def identity(x: Tensor) -> Tensor:
    """Return ``x`` unchanged (real models; datasets already in the wanted layout)."""
    return x


def rgb_gray(x: Tensor) -> Tensor:
    """RGB -> [R, G, B, Y]: one quaternion per pixel with R as the real part.

    >>> rgb_gray(torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)).flatten()
    tensor([1.0000, 0.0000, 0.0000, 0.2990])
    """
    r, g, b = _channels(x, 3, "rgb_gray")
    return torch.stack([r, g, b, _luma(r, g, b)], dim=-3)


def gray_real(x: Tensor) -> Tensor:
    """RGB -> [Y, R, G, B]: gray as the real part, colours as the imaginary parts.

    >>> gray_real(torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)).flatten()
    tensor([0.5870, 0.0000, 1.0000, 0.0000])
    """
    r, g, b = _channels(x, 3, "gray_real")
    return torch.stack([_luma(r, g, b), r, g, b], dim=-3)


def pure(x: Tensor) -> Tensor:
    """RGB -> [0, R, G, B]: a pure quaternion per pixel (real part exactly zero).

    >>> pure(torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)).flatten()
    tensor([0., 1., 2., 3.])
    """
    r, g, b = _channels(x, 3, "pure")
    return torch.stack([torch.zeros_like(r), r, g, b], dim=-3)


def gray_repeat(x: Tensor) -> Tensor:
    """Gray (1 channel) -> [Y, Y, Y, Y], for quaternion conv nets on grayscale data.

    >>> gray_repeat(torch.zeros(1, 28, 28)).shape
    torch.Size([4, 28, 28])
    """
    (y,) = _channels(x, 1, "gray_repeat")
    return torch.stack([y, y, y, y], dim=-3)


def group4(x: Tensor) -> Tensor:
    """Gray (1, H, W) -> flat (H*W,) vector: 4 consecutive pixels make one quaternion.

    Pixel ``4q + c`` (row-major) becomes component ``c`` of quaternion ``q``, stored in
    blocked layout: ``out[c * (H*W // 4) + q] = pixel[4q + c]``. A 28x28 image gives 196
    quaternions (784 reals), the input of a quaternion MLP. A batch (N, 1, H, W) gives
    (N, H*W).

    >>> group4(torch.zeros(1, 28, 28)).shape
    torch.Size([784])
    """
    _channels(x, 1, "group4")
    pixels = x.flatten(-3)
    n = pixels.shape[-1]
    if n % 4:
        raise ValueError(f"encoding 'group4' needs H*W divisible by 4; got {n} pixels")
    quats = pixels.unflatten(-1, (n // 4, 4))  # [..., q, c] = pixel[4q + c]
    return quats.transpose(-1, -2).flatten(-2)


ENCODINGS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": identity,
    "rgb_gray": rgb_gray,
    "gray_real": gray_real,
    "pure": pure,
    "group4": group4,
    "gray_repeat": gray_repeat,
}
"""Encoding name -> function of one (C,H,W) image or (N,C,H,W) batch."""

INPUT_CHANNELS: dict[str, int | None] = {
    "identity": None,
    "rgb_gray": 3,
    "gray_real": 3,
    "pure": 3,
    "group4": 1,
    "gray_repeat": 1,
}
"""Encoding name -> the channel count it accepts (None: any)."""


def get_encoding(name: str, channels: int | None = None) -> Callable[[Tensor], Tensor]:
    """The encoding called ``name``; if ``channels`` is given, check that it fits.

    >>> get_encoding("rgb_gray", channels=3).__name__
    'rgb_gray'
    """
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; valid encodings: {', '.join(ENCODINGS)}")
    needed = INPUT_CHANNELS[name]
    if channels is not None and needed is not None and needed != channels:
        fitting = [e for e, c in INPUT_CHANNELS.items() if c in (None, channels)]
        raise ValueError(
            f"encoding {name!r} needs {needed}-channel images but the data has {channels}; "
            f"encodings for {channels}-channel data: {', '.join(fitting)}"
        )
    return ENCODINGS[name]
