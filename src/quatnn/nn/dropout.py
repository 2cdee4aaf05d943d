"""Quaternion dropout: zero whole quaternions (all four components together)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class QDropout(nn.Module):
    """Drop each quaternion with probability ``p`` in training, scale survivors by 1/(1-p).

    ``dim`` is the blocked feature axis (1 for (N, C, ...), -1 for (..., C) tokens). With
    ``spatial=True`` a whole quaternion *channel* is dropped for a sample (like
    ``nn.Dropout2d``); otherwise every position is drawn on its own.

    Example:
        >>> drop = QDropout(0.5)
        >>> drop(torch.ones(2, 8)).shape
        torch.Size([2, 8])
    """

    def __init__(self, p: float = 0.5, dim: int = 1, spatial: bool = False) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"QDropout: p must be in [0, 1], got {p}")
        self.p, self.dim, self.spatial = p, dim, spatial

    def forward(self, x: Tensor) -> Tensor:
        dim = self.dim % x.dim()
        if x.shape[dim] % 4:
            raise ValueError(f"QDropout: axis {dim} has size {x.shape[dim]}, not divisible by 4")
        if self.spatial and dim == x.dim() - 1:
            raise ValueError(
                f"QDropout: spatial=True drops channels over the axes after the feature axis, "
                f"but axis {dim} is the last of a {x.dim()}-d input"
            )
        if not self.training or self.p == 0.0:
            return x
        q = x.unflatten(dim, (4, -1))
        shape = list(q.shape)
        shape[dim] = 1
        if self.spatial:
            shape[dim + 2 :] = [1] * len(shape[dim + 2 :])
        if self.p == 1.0:  # zeros that keep the graph (zero gradients), as nn.Dropout(1)
            return x * 0.0
        keep = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return (q * keep / (1 - self.p)).flatten(dim, dim + 1)

    def extra_repr(self) -> str:
        return f"p={self.p}, dim={self.dim}, spatial={self.spatial}"
