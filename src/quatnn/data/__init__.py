"""Datasets and input encodings for quaternion and real models.

Datasets: the bundled offline ``digits`` (UCI handwritten digits, Alpaydin & Kaynak 1998,
CC BY 4.0; 8x8 images upsampled to 28x28) and ``digits-color`` (the same digits painted
in random colours on 32x32 RGB), and through torchvision ``mnist``, ``fashion-mnist``,
``cifar10``, ``cifar100``, ``svhn``, downsampled ImageNet (``imagenet32``, ``imagenet64``)
and any ``imagefolder`` tree. Encodings turn an image
into the tensor a model variant reads (see :mod:`quatnn.data.encodings`);
:func:`validation_split` holds out a stratified part of a training set.

Example:
    >>> from quatnn import data
    >>> enc = data.default_encoding("digits-color", "quaternion")
    >>> train = data.load("digits-color", train=True, encoding=enc)
    >>> enc, train[0][0].shape, data.info("digits-color").num_classes
    ('rgb_gray', torch.Size([4, 32, 32]), 10)
"""

from quatnn.data.datasets import load, preprocessing
from quatnn.data.encodings import ENCODINGS
from quatnn.data.registry import (
    DatasetInfo,
    DatasetMissingError,
    default_encoding,
    info,
    is_color,
    names,
)
from quatnn.data.splits import validation_split

__all__ = [
    "ENCODINGS",
    "DatasetInfo",
    "DatasetMissingError",
    "default_encoding",
    "info",
    "is_color",
    "load",
    "names",
    "preprocessing",
    "validation_split",
]
