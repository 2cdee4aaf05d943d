"""Reproducible randomness: global seeding, RNG state capture, and data order and
augmentation that depend only on (seed, epoch, sample).

Shuffling and augmentation do not draw from a running generator: epoch ``e`` is
shuffled by a generator seeded from ``(seed, e)``, and sample ``i`` of epoch ``e`` is
transformed under a torch seed made from ``(seed, e, i)``. So an epoch is the same
whether it runs after a resume or not, with 0 or 8 loader workers, persistent or not.
(torchvision transforms draw from torch's generator; a transform that uses ``random`` or
``numpy`` directly is seeded per worker only.)

Example:
    >>> sampler = EpochSampler(4, seed=0)
    >>> sampler.set_epoch(1)
    >>> sorted(list(sampler)) == [(1, i) for i in range(4)]
    True
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

_MASK64 = (1 << 64) - 1
_SHUFFLE = 0x5EED


def mix(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 steps).

    >>> mix(0, 1) != mix(1, 0)
    True
    """
    x = 0
    for v in values:
        x = (x ^ (v & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return x >> 1


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed ``random`` and numpy from the worker's torch
    seed (which the loader derives from its seeded generator)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict:
    """The state of every global generator, in a form ``torch.load(weights_only=True)``
    reads back: python, numpy, torch CPU and (when initialized) CUDA."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where CUDA is in use)."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` for every sample, shuffled by a generator seeded from
    ``(seed, epoch)`` (in order with ``shuffle=False``). Call :meth:`set_epoch` first."""

    def __init__(self, length: int, seed: int, shuffle: bool = True) -> None:
        self.length, self.seed, self.shuffle, self.epoch = length, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = range(self.length)
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix(_SHUFFLE, self.seed, self.epoch))
            order = torch.randperm(self.length, generator=generator).tolist()
        return ((self.epoch, i) for i in order)


class SeededDataset(Dataset):
    """Reads ``dataset[index]`` for keys ``(epoch, index)`` with torch's CPU generator
    seeded from ``(seed, epoch, index)``, restoring the generator afterwards."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> object:
        epoch, index = key
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(mix(self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(saved)
