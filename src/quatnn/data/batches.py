"""Datasets stored as pickled batches of uint8 image rows (the red plane, then green,
then blue, each row-major): CIFAR-10/100, and downsampled ImageNet (Chrabaszcz,
Loshchilov & Hutter 2017, arXiv:1707.08819: all 1,281,167 training and 50,000 validation
images of ILSVRC 2012 at 32x32 or 64x64 pixels, 1000 classes).

Downsampled ImageNet comes from image-net.org (an account is needed, so quatnn cannot
download it): ``train_data_batch_1`` to ``train_data_batch_10`` and ``val_data``, each a
pickled dict or the ``.npz`` of the same arrays, with ``data`` and ``labels`` (1 to
1000). The first load of a split converts each file into ``<file>.images.npy`` (uint8
(n, S, S, 3)) and ``<file>.labels.npy`` beside it, each written whole or not at all;
later loads map the images from disk instead of unpickling them, so the processes and
loader workers of a run share the page cache instead of each holding the split (15.7 GB
for 64x64 training images). A converted file older than its source is converted again.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> rows = np.zeros((3, 3 * 8 * 8), np.uint8)
    >>> np.savez(os.path.join(folder, "val_data.npz"), data=rows, labels=[1, 2, 1000])
    >>> val = DownsampledImageNet(folder, size=8, train=False)
    >>> len(val), val[2][0].shape, val[2][1], val.classes[999]
    (3, (8, 8, 3), 999, '1000')
"""

from __future__ import annotations

import os
import pickle
import uuid
import zipfile
from collections.abc import Callable

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision.datasets.utils import download_and_extract_archive

IMAGENET_FILES = {True: [f"train_data_batch_{i}" for i in range(1, 11)], False: ["val_data"]}
"""The files of each downsampled ImageNet split (``True``: train), each also as ``.npz``."""
_CONVERT_ROWS = 10_000  # images transposed into the .npy at a time (bounded memory)


class CifarBatches(Dataset):
    """CIFAR-10 or CIFAR-100 read from its python batches (``cifar-10-batches-py`` etc.).

    torchvision's own classes also check every batch's MD5, which rejects any other file
    in the same format; here the archive's MD5 is checked on download instead.
    Items are ``(transform(image), label)`` with ``image`` a uint8 (32, 32, 3) array.
    """

    def __init__(
        self,
        cls: type[tvd.CIFAR10],
        root: str | os.PathLike,
        train: bool,
        transform: Callable | None,
        download: bool,
    ) -> None:
        folder = os.path.join(root, cls.base_folder)
        files = [f for f, _ in (cls.train_list if train else cls.test_list)]
        needed = [os.path.join(folder, f) for f in files + [cls.meta["filename"]]]
        if download and not all(map(os.path.isfile, needed)):
            download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5)
        missing = [os.path.basename(p) for p in needed if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"missing {', '.join(missing)}")
        arrays, self.targets = [], []
        for path in needed[:-1]:
            entry = _unpickle(path)
            try:
                images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                labels = [int(t) for t in entry.get("labels", entry.get("fine_labels"))]
            except (KeyError, TypeError, ValueError) as err:
                raise RuntimeError(f"{path} holds no CIFAR batch ({err})") from None
            if len(labels) != len(images):
                raise RuntimeError(f"{path} holds {len(images)} images, {len(labels)} labels")
            arrays.append(images)
            self.targets += labels
        self.data = np.concatenate(arrays).transpose(0, 2, 3, 1)
        self.classes = list(_unpickle(needed[-1])[cls.meta["key"]])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = self.data[i]
        return (self.transform(image) if self.transform else image), self.targets[i]


def _unpickle(path: str) -> dict:
    """The dict pickled in ``path``; RuntimeError naming the file if it holds none."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as err:
        raise RuntimeError(f"{path} is damaged ({type(err).__name__}: {err})") from None
    if not isinstance(entry, dict):
        raise RuntimeError(f"{path} holds a {type(entry).__name__}, not a batch of images")
    return entry


def imagenet_source(folder: str | os.PathLike, name: str) -> str | None:
    """The path of downsampled ImageNet file ``name`` in ``folder`` (``name``, else
    ``name.npz``), or None if neither exists."""
    for path in (os.path.join(folder, name), os.path.join(folder, name + ".npz")):
        if os.path.isfile(path):
            return path
    return None


class DownsampledImageNet(Dataset):
    """The train or validation split of downsampled ImageNet at ``size`` x ``size`` pixels
    from ``folder`` (see the module docstring). Items are ``(transform(image), label)``
    with ``image`` a uint8 (size, size, 3) array and ``label`` in 0..999 (the files'
    label minus one; ``classes`` are the files' labels as strings)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        size: int,
        train: bool,
        transform: Callable | None = None,
    ) -> None:
        names = IMAGENET_FILES[train]
        sources = [imagenet_source(folder, name) for name in names]
        missing = [name for name, path in zip(names, sources, strict=True) if path is None]
        if missing:
            shown = ", ".join(missing[:2]) + (
                f", ... ({len(missing)} files)" if len(missing) > 2 else ""
            )
            raise FileNotFoundError(f"missing {shown}")
        converted = [_converted(path, size) for path in sources]
        self.image_files = [images_path for images_path, _ in converted]
        counts, labels = [], []
        for images_path, labels_path in converted:
            images = np.load(images_path, mmap_mode="r")
            counts.append(len(images))
            labels.append(np.load(labels_path))
            if images.shape[1:] != (size, size, 3) or len(labels[-1]) != len(images):
                raise RuntimeError(
                    f"{images_path} is damaged; delete it to convert its source again"
                )
        self.offsets = np.cumsum([0, *counts])
        self.targets = np.concatenate(labels)
        self.classes = [str(k) for k in range(1, 1001)]
        self.transform = transform
        self._images: list[np.ndarray] | None = None  # the maps, opened on first use

    def __getstate__(self) -> dict:  # a worker process maps the files itself
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        if self._images is None:
            self._images = [np.load(path, mmap_mode="r") for path in self.image_files]
        part = int(np.searchsorted(self.offsets, i, side="right")) - 1
        image = np.array(self._images[part][i - self.offsets[part]])  # a copy, off the map
        return (self.transform(image) if self.transform else image), int(self.targets[i])


def _converted(source: str, size: int) -> tuple[str, str]:
    """The ``.images.npy`` and ``.labels.npy`` of downsampled ImageNet file ``source``,
    converted now unless both are newer than ``source``."""
    stem = source.removesuffix(".npz")
    images_path, labels_path = stem + ".images.npy", stem + ".labels.npy"
    mtime = os.path.getmtime(source)
    if all(os.path.isfile(p) and os.path.getmtime(p) >= mtime for p in (images_path, labels_path)):
        return images_path, labels_path
    if source.endswith(".npz"):
        try:
            with np.load(source) as batch:
                data, labels = batch["data"], batch["labels"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise RuntimeError(f"{source} is damaged ({type(err).__name__}: {err})") from None
    else:
        entry = _unpickle(source)
        data, labels = entry.get("data"), entry.get("labels")
    try:
        data = np.asarray(data, dtype=np.uint8)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1) - 1
    except (TypeError, ValueError) as err:
        raise RuntimeError(f"{source} holds no batch of images ({err})") from None
    if data.ndim != 2 or data.shape[1] != 3 * size * size:
        raise RuntimeError(
            f"{source} holds rows of {data.shape[1:]} values, not the {3 * size * size} of "
            f"{size}x{size} RGB images (a file of another resolution?)"
        )
    if len(labels) != len(data) or not ((labels >= 0) & (labels < 1000)).all():
        raise RuntimeError(f"{source} needs one label from 1 to 1000 per image")
    _save_atomic(labels_path, lambda path: np.save(path, labels))

    def write_images(path: str) -> None:
        out = np.lib.format.open_memmap(path, "w+", np.uint8, (len(data), size, size, 3))
        for start in range(0, len(data), _CONVERT_ROWS):
            rows = data[start : start + _CONVERT_ROWS].reshape(-1, 3, size, size)
            out[start : start + len(rows)] = rows.transpose(0, 2, 3, 1)
        out.flush()
        del out

    _save_atomic(images_path, write_images)
    return images_path, labels_path


def _save_atomic(path: str, write: Callable[[str], None]) -> None:
    """``write`` a temporary ``.npy`` beside ``path``, then rename it onto ``path``."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.npy"  # (another job may convert too)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:  # (not a damaged dataset: a ValueError, not a RuntimeError)
        raise ValueError(
            f"cannot write {path} ({err}): downsampled ImageNet is converted once into .npy "
            "files beside its own, so its folder must be writable"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
