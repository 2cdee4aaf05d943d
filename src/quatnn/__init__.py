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

from quatnn._lazy import lazy_names

__version__ = "0.1.0"
__all__ = ["algebra", "functional", "nn", "load", "__version__"]

__getattr__, __dir__ = lazy_names(
    __name__,
    {"load": "export.compact"},  # quatnn.load(path): a compact checkpoint -> model
    ("algebra", "functional", "nn", "models", "data", "train", "prune", "report", "export",
     "bench"),
)  # fmt: skip
