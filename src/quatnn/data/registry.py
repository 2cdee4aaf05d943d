"""What quatnn knows about each dataset: shape, classes, normalization, augmentation.

Example:
    >>> info("cifar10").num_classes, info("cifar10").image_size, info("cifar10").color
    (10, (32, 32), True)
    >>> default_encoding("mnist", "quaternion", flat=True)
    'group4'
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image
from torchvision import datasets as tvd
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from quatnn.data.batches import IMAGENET_FILES, imagenet_source


class DatasetMissingError(Exception):
    """A dataset's files are not on disk and could not be downloaded.

    The message names the dataset, the folder, the files to place there and where to
    get them.
    """


@dataclass(frozen=True)
class DatasetInfo:
    """Shape and class count of a dataset as :func:`quatnn.data.load` delivers it."""

    name: str
    num_classes: int
    channels: int
    image_size: tuple[int, int]
    color: bool
    bundled: bool


@dataclass(frozen=True)
class _Spec:
    num_classes: int
    channels: int
    image_size: tuple[int, int]
    bundled: bool = False
    mean: tuple[float, ...] = ()  # published per-channel constants; bundled: computed
    std: tuple[float, ...] = ()
    padding: int = 0  # RandomCrop padding of the standard train augmentation
    padding_mode: str = "constant"  # its fill: zeros, or "edge" where the border is background
    flip: bool = False  # RandomHorizontalFlip in the standard train augmentation


_GRAY28 = {"channels": 1, "image_size": (28, 28), "padding": 2}
_RGB32 = {"channels": 3, "image_size": (32, 32), "padding": 4}
_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "flip": True}
IMAGENET_SIZES = {"imagenet32": 32, "imagenet64": 64}
"""Downsampled ImageNet: dataset name -> image side (see :mod:`quatnn.data.batches`)."""
_SPECS: dict[str, _Spec] = {
    "digits": _Spec(10, bundled=True, **_GRAY28),
    "digits-color": _Spec(10, bundled=True, padding_mode="edge", **_RGB32),
    "mnist": _Spec(10, mean=(0.1307,), std=(0.3081,), **_GRAY28),
    "fashion-mnist": _Spec(10, mean=(0.2860,), std=(0.3530,), **_GRAY28),
    "cifar10": _Spec(
        10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), flip=True, **_RGB32
    ),
    "cifar100": _Spec(
        100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), flip=True, **_RGB32
    ),
    "svhn": _Spec(10, mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970), **_RGB32),
    # ImageNet's statistics; crops padded by an eighth of the side, as CIFAR's 4 of 32
    "imagenet32": _Spec(1000, 3, (32, 32), padding=4, **_IMAGENET),
    "imagenet64": _Spec(1000, 3, (64, 64), padding=8, **_IMAGENET),
    # ImageNet statistics; classes and image size come from the folder tree.
    "imagefolder": _Spec(0, 3, (0, 0), padding=4, **_IMAGENET),
}

COLOR_VARIANTS = ("real3", "real4", "quaternion")
GRAY_VARIANTS = ("real", "quaternion")


def names() -> list[str]:
    """Names accepted by :func:`info` and :func:`quatnn.data.load`.

    >>> names()[:2]
    ['digits', 'digits-color']
    """
    return list(_SPECS)


def spec(name: str) -> _Spec:
    """The internal record of ``name`` (ValueError listing valid names if unknown)."""
    if name not in _SPECS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(_SPECS)}")
    return _SPECS[name]


def is_color(name: str) -> bool:
    """Whether dataset ``name`` is RGB, known without reading any file (image folders
    are read as RGB).

    >>> is_color("cifar10"), is_color("imagefolder"), is_color("mnist")
    (True, True, False)
    """
    return spec(name).channels == 3


def imagefolder_split(root: str | os.PathLike, train: bool) -> str:
    """The split folder of an image tree: ``root/train``, else ``root/val`` or ``root/test``.

    Returns the first candidate that exists, or the first candidate if none does.
    """
    candidates = ["train"] if train else ["val", "test"]
    paths = [os.path.join(root, c) for c in candidates]
    return next((p for p in paths if os.path.isdir(p)), paths[0])


def _layout(name: str, root: str | os.PathLike) -> tuple[str, dict[bool, list[str]], str]:
    """(folder, {train: files of that split expected there}, where to get them) for a
    dataset of files (all but the bundled ones and image folders)."""
    if name in IMAGENET_SIZES:
        side = IMAGENET_SIZES[name]
        source = f"https://image-net.org/download-images (Downsampled ImageNet {side}x{side})"
        return os.path.join(root, name), IMAGENET_FILES, source
    if name in ("mnist", "fashion-mnist"):
        cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        files = [os.path.splitext(f)[0] for f, _ in cls.resources]
        split = {t: [f for f in files if f.startswith("train") == t] for t in (True, False)}
        return os.path.join(root, cls.__name__, "raw"), split, cls.mirrors[0]
    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        meta = [cls.meta["filename"]]
        split = {t: [f for f, _ in (cls.train_list if t else cls.test_list)] + meta
                 for t in (True, False)}  # fmt: skip
        return os.path.join(root, cls.base_folder), split, f"{cls.url} (extracted)"
    # svhn
    split = {t: [tvd.SVHN.split_list["train" if t else "test"][1]] for t in (True, False)}
    source = tvd.SVHN.split_list["train"][0].rsplit("/", 1)[0] + "/"
    return os.path.join(root, "svhn"), split, source


def files_present(name: str, root: str | os.PathLike, train: bool) -> bool:
    """Whether every file the split of dataset ``name`` (of files) reads is in place (so
    a failure to read them means they are damaged, not missing)."""
    folder, split, _ = _layout(name, root)
    if name in IMAGENET_SIZES:
        return all(imagenet_source(folder, f) for f in split[train])
    return all(os.path.isfile(os.path.join(folder, f)) for f in split[train])


def missing_error(name: str, root: str | os.PathLike, reason: str) -> DatasetMissingError:
    """The :class:`DatasetMissingError` for dataset ``name`` under ``root``."""
    root = os.path.abspath(root)
    if name == "imagefolder":
        return DatasetMissingError(
            f"dataset 'imagefolder' not found under {root} ({reason}). Place the images as "
            f"{root}/train/<class>/<image>.png and {root}/val/<class>/<image>.png (or test/); "
            "image folders cannot be downloaded."
        )
    folder, split, source = _layout(name, root)
    files = ", ".join(dict.fromkeys(split[True] + split[False]))
    if name in IMAGENET_SIZES:
        return DatasetMissingError(
            f"dataset {name!r} not found in {folder} ({reason}). Place the files "
            "train_data_batch_1 to train_data_batch_10 and val_data there (pickled, or the "
            f".npz of each), from {source}; quatnn cannot download them (an image-net.org "
            "account is needed)."
        )
    reason = reason.replace(" You can use download=True to download it", "")  # torchvision's
    return DatasetMissingError(
        f"dataset {name!r} not found in {folder} ({reason}). Place the files {files} there, "
        f"or download them from {source} with network access (download=True; the quatnn "
        "commands download by default, --no-download turns it off)."
    )


def new_folders(name: str, root: str | os.PathLike) -> list[str]:
    """The folders that loading the downloadable dataset ``name`` from ``root`` may create
    and that do not exist yet, deepest first (a failed load removes them again)."""
    if name in IMAGENET_SIZES:
        return []  # never downloaded
    folder, created = os.path.abspath(_layout(name, root)[0]), []
    while not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    return created


def info(name: str, root: str | os.PathLike | None = None) -> DatasetInfo:
    """Shape, class count and kind of dataset ``name``.

    ``root`` is only read for ``"imagefolder"``: the classes are the subfolders of
    ``root/train`` and ``image_size`` is that of its first image (images are loaded as
    RGB; pass ``image_size`` to :func:`quatnn.data.load` to resize them all).

    >>> info("digits").image_size
    (28, 28)
    """
    s = spec(name)
    num_classes, image_size = s.num_classes, s.image_size
    if name == "imagefolder":
        if root is None:
            raise ValueError("info('imagefolder') needs root, the folder holding train/")
        folder = imagefolder_split(root, train=True)
        try:
            classes, class_to_idx = find_classes(folder)
            first_path = make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS)[0][0]
        except FileNotFoundError as err:
            raise missing_error(name, root, str(err)) from err
        with Image.open(first_path) as im:
            width, height = im.size
        num_classes, image_size = len(classes), (height, width)
    return DatasetInfo(name, num_classes, s.channels, image_size, s.channels == 3, s.bundled)


def default_encoding(name_or_info: str | DatasetInfo, variant: str, flat: bool = False) -> str:
    """The encoding that feeds a model ``variant`` with this dataset.

    Colour data: ``real3`` -> ``identity``, ``real4`` and ``quaternion`` -> ``rgb_gray``.
    Grayscale data: ``real`` -> ``identity``, ``quaternion`` -> ``group4`` when the model
    reads flat vectors (``flat=True``), else ``gray_repeat``.

    >>> default_encoding("cifar10", "real4")
    'rgb_gray'
    >>> default_encoding("mnist", "quaternion")
    'gray_repeat'
    """
    if isinstance(name_or_info, DatasetInfo):
        name, color = name_or_info.name, name_or_info.color
    else:
        name, color = name_or_info, is_color(name_or_info)
    valid = COLOR_VARIANTS if color else GRAY_VARIANTS
    if variant not in valid:
        kind = "colour (RGB)" if color else "grayscale"
        raise ValueError(
            f"variant {variant!r} does not fit {kind} dataset {name!r}; "
            f"variants for {kind} data: {', '.join(valid)}"
        )
    if variant == "quaternion":
        return "rgb_gray" if color else ("group4" if flat else "gray_repeat")
    return "rgb_gray" if variant == "real4" else "identity"
