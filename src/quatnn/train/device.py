"""Devices: choosing one, describing it, and the loader and precision settings that fit it.

Example:
    >>> resolve("cpu")
    device(type='cpu')
    >>> loader_options(resolve("cpu"), workers=-1, bundled=True)
    {'num_workers': 0, 'pin_memory': False, 'persistent_workers': False}
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from quatnn.train.errors import RunError


def resolve(name: str) -> torch.device:
    """``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``;
    RunError if the device is unknown or not available here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise RunError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"device {name!r}: CUDA is not available here; use --device cpu")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise RunError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RunError(f"device {name!r}: MPS is not available here; use --device cpu")
    return device


def describe(device: torch.device) -> str:
    """A readable name, e.g. ``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu (2 threads)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'s' if threads > 1 else ''})"
    return str(device)


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype for ``--amp``: bfloat16 where the device supports it, else
    float16 (which needs loss scaling)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.float16 if device.type == "mps" else torch.bfloat16


def loader_options(device: torch.device, workers: int, bundled: bool, processes: int = 1) -> dict:
    """DataLoader settings: ``workers`` -1 means 0 on CPU or for the in-memory bundled
    data, else half the cores up to 8 (shared by the ``processes`` training processes of
    this machine); pinned memory on CUDA; persistent workers."""
    if workers < 0:
        cores = (os.cpu_count() or 2) // max(1, processes)
        workers = 0 if device.type == "cpu" or bundled else min(8, cores // 2)
    return {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": workers > 0,
    }


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels (a warning where none exists) and no autotuning inside; the
    caller's settings again after."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]
