"""Tiny datasets written in the real on-disk formats, for end-to-end tests offline.

- MNIST: ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (big-endian idx)
- CIFAR-10: ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` (pickles)
- downsampled ImageNet: ``root/imagenet<S>/{train_data_batch_1..10,val_data}`` (pickles, or
  ``.npz``)

Images are random bytes, so nothing can be learned from them: they test reading and
shapes, not accuracy.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def _idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the idx format (magic 0x08 = unsigned byte, then dims)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: str | Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    """Random 28x28 MNIST files under ``root/MNIST/raw``; returns ``root``."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    return Path(root)


def write_cifar10(root: str | Path, per_batch: int = 8, n_test: int = 20, seed: int = 0) -> Path:
    """Random CIFAR-10 python batches under ``root/cifar-10-batches-py``; returns ``root``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        batch = {
            "data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return Path(root)


def write_imagenet(
    root: str | Path, size: int = 32, per_batch: int = 6, n_val: int = 10, npz: bool = False,
    seed: int = 0,
) -> Path:  # fmt: skip
    """Random downsampled ImageNet batches of ``size`` x ``size`` images (labels 1..1000)
    under ``root/imagenet<size>``, as image-net.org's pickles or their ``.npz``; returns
    ``root``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / f"imagenet{size}"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"train_data_batch_{i}" for i in range(1, 11)] + ["val_data"]
    for name in names:
        n = n_val if name == "val_data" else per_batch
        data = rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8)
        labels = rng.integers(1, 1001, n).tolist()
        if npz:
            np.savez(folder / f"{name}.npz", data=data, labels=labels)
        else:
            batch = {"data": data, "labels": labels, "mean": data.mean(0)}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return Path(root)
