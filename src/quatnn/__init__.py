"""quatnn: quaternion neural networks for PyTorch.

Example:
    >>> import torch, quatnn
    >>> layer = quatnn.nn.QLinear(8, 4)
    >>> layer(torch.randn(2, 8)).shape
    torch.Size([2, 4])
"""

from quatnn import algebra, functional, nn

__version__ = "0.1.0"
__all__ = ["algebra", "functional", "nn", "__version__"]
