"""The bundled offline datasets "digits" and "digits-color".

Source: the UCI "Optical Recognition of Handwritten Digits" data set, E. Alpaydin and
C. Kaynak (1998), https://doi.org/10.24432/C50P49, licensed CC BY 4.0. ``digits.npz``
holds its 1797 8x8 images (uint8, values 0..16) and their labels (uint8, 0..9), exported
once from ``sklearn.datasets.load_digits`` (scikit-learn is not needed at run time).

- ``digits``: each image scaled to [0, 1] and upsampled to 28x28 (bilinear, no
  antialiasing), so every MNIST-shaped model runs on it: float (1, 28, 28).
- ``digits-color``: the same 28x28 digit centred on a 32x32 canvas (a 2-pixel background
  border) and painted ``a * fg + (1 - a) * bg`` with ``a`` the digit intensity and a
  foreground/background RGB colour pair drawn for each image from a generator seeded by
  the image index: float (3, 32, 32), CIFAR-shaped. The colours never look at the label,
  so they carry no class information.

The split is fixed: per class, a permutation seeded by :data:`SPLIT_SEED` puts 80% of
the images in train and the rest in test (1438 / 359 images, disjoint).

Example:
    >>> ds = BundledDigits("digits", train=True)
    >>> len(ds), ds[0][0].shape
    (1438, torch.Size([1, 28, 28]))
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from quatnn.data.splits import stratified_split

SPLIT_SEED = 5
"""Seed of the fixed per-class train/test permutation."""
COLOUR_SEED = 1998
"""Seed mixed with the image index to draw each digits-color image's colours."""
TRAIN_FRACTION = 0.8
MIN_CONTRAST = 0.5
"""Smallest Euclidean RGB distance between an image's foreground and background."""


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    with resources.files("quatnn.data").joinpath("digits.npz").open("rb") as f, np.load(f) as z:
        return z["images"], z["labels"]


@lru_cache(maxsize=1)
def gray_images() -> Tensor:
    """All 1797 digits as float (1797, 1, 28, 28) in [0, 1]."""
    images, _ = _raw()
    x = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    return F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=False)


def colours(index: int) -> tuple[np.ndarray, np.ndarray]:
    """The (foreground, background) RGB colours in [0, 1] of digits-color image ``index``.

    >>> fg, bg = colours(0)
    >>> bool(np.linalg.norm(fg - bg) >= MIN_CONTRAST)
    True
    """
    rng = np.random.default_rng([COLOUR_SEED, index])
    while True:
        fg, bg = rng.random(3), rng.random(3)
        if np.linalg.norm(fg - bg) >= MIN_CONTRAST:
            return fg.astype(np.float32), bg.astype(np.float32)


@lru_cache(maxsize=1)
def colour_images() -> Tensor:
    """All 1797 digits-color images as float (1797, 3, 32, 32) in [0, 1]."""
    a = F.pad(gray_images(), (2, 2, 2, 2))
    pairs = [colours(i) for i in range(a.shape[0])]
    fg = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, :, None, None]
    bg = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, :, None, None]
    return a * fg + (1 - a) * bg


@lru_cache(maxsize=2)
def split_indices(train: bool) -> np.ndarray:
    """Sorted indices (into the 1797 images) of the fixed stratified train or test split."""
    train_indices, test_indices = stratified_split(_raw()[1], TRAIN_FRACTION, SPLIT_SEED)
    return train_indices if train else test_indices


_IMAGES = {"digits": gray_images, "digits-color": colour_images}


@lru_cache(maxsize=2)
def train_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of the train split of ``name``, for ``Normalize``."""
    x = _IMAGES[name]()[split_indices(True)]
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).tolist())


class BundledDigits(Dataset):
    """The train or test split of ``"digits"`` or ``"digits-color"``.

    Items are ``(transform(image), label)``; ``indices`` are the images' positions in
    the original 1797, ``targets`` their labels.
    """

    def __init__(
        self, name: str, train: bool, transform: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        if name not in _IMAGES:
            raise ValueError(f"unknown bundled dataset {name!r}; valid: {', '.join(_IMAGES)}")
        self.indices = split_indices(train)
        self.images = _IMAGES[name]()[self.indices]
        self.targets = _raw()[1][self.indices].tolist()
        self.transform = transform
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = self.images[i]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[i]
