"""quatnn: quaternion neural networks for PyTorch.

Subpackages ``algebra``, ``functional``, ``nn``, ``models``, ``data``, ``train``,
``prune``, ``report``, ``export`` and ``bench`` are imported on first use, so that
``import quatnn`` (and the ``quatnn`` command's start, which can then take Ctrl-C while
torch loads) does not import torch.

Example:
    >>> import torch, quatnn
    >>> layer = quatnn.nn.QLinear(8, 4)
    >>> layer(torch.randn(2, 8)).shape
    torch.Size([2, 4])
"""

import importlib

__version__ = "0.1.0"
__all__ = ["algebra", "functional", "nn", "load", "__version__"]

_LAZY = (
    "algebra",
    "functional",
    "nn",
    "models",
    "data",
    "train",
    "prune",
    "report",
    "export",
    "bench",
)


def __getattr__(name: str):
    if name == "load":  # quatnn.load(path): a compact checkpoint -> model
        from quatnn.export.compact import load

        return load
    if name in _LAZY:
        return importlib.import_module(f"quatnn.{name}")
    raise AttributeError(f"module 'quatnn' has no attribute {name!r}")
