"""Loading datasets: torchvision downloads, the bundled digits, transforms and encodings.

Example:
    >>> train = load("digits-color", train=True, encoding="rgb_gray")
    >>> image, label = train[0]
    >>> image.shape, type(label)
    (torch.Size([4, 32, 32]), <class 'int'>)
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable

from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision import transforms as T
from torchvision.datasets.folder import find_classes
from torchvision.datasets.vision import StandardTransform

from quatnn.data import bundled
from quatnn.data.batches import CifarBatches, DownsampledImageNet
from quatnn.data.encodings import get_encoding
from quatnn.data.registry import (
    IMAGENET_SIZES,
    files_present,
    imagefolder_split,
    info,
    missing_error,
    new_folders,
    spec,
)


class _SplitImageFolder(tvd.ImageFolder):
    """The val/test split of an image tree, labelled with the train split's class indices
    (its own folders may be fewer; a class that train lacks is an error)."""

    def __init__(self, folder: str, classes: list[str], transform: Callable) -> None:
        self.train_classes = classes
        super().__init__(folder, transform=transform, allow_empty=True)
        if not self.samples:
            raise FileNotFoundError(f"no images in {folder}")

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        found, _ = super().find_classes(directory)
        extra = sorted(set(found) - set(self.train_classes))
        if extra:
            raise ValueError(
                f"{directory} holds classes that the train split lacks: {', '.join(extra)} "
                f"(train's: {', '.join(self.train_classes)})"
            )
        return list(self.train_classes), {c: i for i, c in enumerate(self.train_classes)}


def _transform(
    name: str,
    train: bool,
    augment: bool | None,
    encode: Callable[[Tensor], Tensor],
    image_size: tuple[int, int],
) -> T.Compose:
    s = spec(name)
    steps: list[Callable] = [T.Resize(image_size)] if name == "imagefolder" else []
    if not s.bundled:
        steps.append(T.ToTensor())
    if train if augment is None else augment:
        steps.append(T.RandomCrop(image_size, padding=s.padding, padding_mode=s.padding_mode))
        if s.flip:
            steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.Normalize(*_normalization(name)), encode])


def _normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)``: published constants; the bundled sets' computed."""
    s = spec(name)
    return bundled.train_stats(name) if s.bundled else (s.mean, s.std)


def preprocessing(name: str, encoding: str, image_size: tuple[int, int]) -> dict:
    """What :func:`load` does to a test image of dataset ``name`` (``image_size`` pixels)
    for a model reading ``encoding``, as a deployed model needs it: the ``image_size``,
    the per-channel ``mean`` and ``std`` of ``(x - mean) / std`` on the image in [0, 1],
    the ``encoding`` applied last, and these ``steps`` in words.

    >>> p = preprocessing("mnist", "gray_repeat", (28, 28))
    >>> p["mean"], p["std"], p["encoding"]
    ([0.1307], [0.3081], 'gray_repeat')
    """
    mean, std = _normalization(name)
    h, w = image_size
    resize = ", resized (torchvision Resize)" if name == "imagefolder" else ""
    steps = (
        f"image (C, H, W) of {h}x{w} pixels{resize} scaled to [0, 1]; (x - mean) / std per "
        f"channel; then encoding {encoding} (quatnn.data.ENCODINGS)"
    )
    return {"dataset": name, "image_size": [h, w], "mean": list(mean), "std": list(std),
            "encoding": encoding, "steps": steps}  # fmt: skip


def _open(
    name: str, root: str | os.PathLike, train: bool, transform: Callable, download: bool
) -> Dataset:
    if name in ("mnist", "fashion-mnist"):
        cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        mnist = cls(root, train=train, transform=transform, download=download)
        if len(mnist.data) != len(mnist.targets):
            raise RuntimeError(f"{len(mnist.data)} images but {len(mnist.targets)} labels")
        return mnist
    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        return CifarBatches(cls, root, train, transform, download)
    if name == "svhn":
        try:
            import scipy.io  # noqa: F401 (torchvision reads SVHN's .mat files with it)
        except ImportError:
            raise ValueError("reading SVHN needs scipy: pip install 'quatnn[svhn]'") from None
        split = "train" if train else "test"
        folder = os.path.join(root, "svhn")
        svhn = tvd.SVHN(folder, split, transform=transform, download=download)
        svhn.targets, svhn.classes = svhn.labels.tolist(), [str(d) for d in range(10)]
        return svhn
    if name in IMAGENET_SIZES:
        folder = os.path.join(root, name)
        return DownsampledImageNet(folder, IMAGENET_SIZES[name], train, transform)
    if train:
        return tvd.ImageFolder(imagefolder_split(root, True), transform=transform)
    classes, _ = find_classes(imagefolder_split(root, True))
    return _SplitImageFolder(imagefolder_split(root, False), classes, transform)


def load(
    name: str,
    root: str | os.PathLike = "data",
    *,
    train: bool,
    encoding: str = "identity",
    augment: bool | None = None,
    download: bool = True,
    image_size: int | tuple[int, int] | None = None,
    images: Dataset | None = None,
) -> Dataset:
    """The train or test split of dataset ``name``; items are (float32 tensor, int label).

    Each image goes through ``ToTensor`` (scale to [0, 1]), the standard augmentation
    when ``augment`` is True (``None``: only for the train split), ``Normalize`` with the
    dataset's per-channel mean/std, then the encoding (see :mod:`quatnn.data.encodings`).

    Standard train augmentation (no flips for digits, whose mirror images are not digits):

    - mnist, fashion-mnist, digits: RandomCrop(28, padding=2)
    - svhn: RandomCrop(32, padding=4)
    - digits-color: RandomCrop(32, padding=4, padding_mode="edge") (the edge is the
      image's background colour; zeros would frame it in black)
    - cifar10, cifar100, imagenet32: RandomCrop(32, padding=4), RandomHorizontalFlip
    - imagenet64: RandomCrop(64, padding=8), RandomHorizontalFlip
    - imagefolder: RandomCrop(image_size, padding=4), RandomHorizontalFlip

    Files live in ``root``: ``root/MNIST/raw``, ``root/FashionMNIST/raw``,
    ``root/cifar-10-batches-py``, ``root/cifar-100-python``, ``root/svhn`` (reading SVHN
    needs scipy: ``pip install 'quatnn[svhn]'``), ``root/imagenet32``, ``root/imagenet64``
    (downsampled ImageNet: never downloaded, see :mod:`quatnn.data.batches`; its test
    split is ImageNet's validation set). ``download=True`` fetches missing files; when that
    fails (offline), or with ``download=False`` and missing files,
    :class:`DatasetMissingError` says what to place where; damaged files raise ValueError.
    Normalization uses the published statistics (ImageNet's for ``imagefolder`` and
    downsampled ImageNet; the train split's own for the bundled sets).

    ``"digits"`` and ``"digits-color"`` are bundled with quatnn (``root`` and ``download``
    are ignored). For ``"imagefolder"``, ``root`` is a tree ``root/train/<class>/...`` and
    ``root/val/<class>/...`` (or ``test``); images are read as RGB and resized to
    ``image_size`` (``(H, W)``, or one int for squares), by default the size of the first
    training image, so a tree of equal-sized images is read at its own size. Val/test
    images get the class indices of ``train/`` (a class that ``train/`` lacks is an
    error). The other datasets reject ``image_size``. Each returned dataset has
    ``targets`` and ``classes``.

    ``images``, a dataset that ``load`` returned for the same ``name``, ``root`` and split,
    is not read again: the result is a shallow copy of it with this call's transform (an
    unaugmented view of an augmented training split costs no second read of its files or
    second scan of an image tree).

    >>> test = load("digits", train=False, encoding="group4")
    >>> len(test), test[0][0].shape
    (359, torch.Size([784]))
    """
    s = spec(name)
    if image_size is not None and name != "imagefolder":
        raise ValueError(f"image_size is only for 'imagefolder'; {name!r} has a fixed size")
    encode = get_encoding(encoding, channels=s.channels)
    size = s.image_size
    if name == "imagefolder":
        size = info(name, root).image_size if image_size is None else image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
    transform = _transform(name, train, augment, encode, size)
    if images is not None:
        view = copy.copy(images)
        view.transform = transform
        if hasattr(view, "transforms"):  # torchvision's wrapper of both transforms
            view.transforms = StandardTransform(transform, view.target_transform)
        return view
    if s.bundled:
        return bundled.BundledDigits(name, train, transform)
    created = [] if name == "imagefolder" else new_folders(name, root)
    try:
        return _open(name, root, train, transform, download)
    except (OSError, RuntimeError) as err:
        for folder in created:  # leave no empty folders behind
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        reason = " ".join(str(err).split())
        if name != "imagefolder" and files_present(name, root, train):
            raise ValueError(
                f"dataset {name!r} in {root} cannot be read: {reason}. Extract or download "
                "its files again."
            ) from err
        raise missing_error(name, root, reason) from err
