"""Quaternion activations.

Split activations (a real function applied to each of r, i, j, k on its own) are plain
torch activations: on a blocked tensor ``nn.ReLU()``, ``torch.tanh`` etc. act component-wise,
which is exactly the split form used by most quaternion networks. :class:`QModReLU` acts on
the norm of each whole quaternion and keeps its direction.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quatnn.nn.base import quaternion_units


class QModReLU(nn.Module):
    """``f(q) = relu(|q| + b) q / |q|`` with a learnable bias ``b`` per quaternion channel.

    ``num_features`` is in real units; ``dim`` is the blocked feature axis (1 for (N, C, ...)
    tensors, -1 for (..., C) token features). ``b`` starts at 0 (identity on the norms).

    Example:
        >>> act = QModReLU(8)
        >>> act(torch.randn(2, 8, 5)).shape
        torch.Size([2, 8, 5])
    """

    def __init__(
        self,
        num_features: int,
        dim: int = 1,
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        units = quaternion_units("QModReLU", "num_features", num_features)
        self.num_features, self.dim, self.eps = 4 * units, dim, eps
        self.bias = nn.Parameter(torch.empty(units, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``b = 0``: the identity on the norms."""
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        dim = self.dim % x.dim()
        if x.shape[dim] != self.num_features:
            raise ValueError(
                f"QModReLU: input has {x.shape[dim]} features on axis {dim}, "
                f"expected num_features={self.num_features}"
            )
        q = x.unflatten(dim, (4, -1))
        modulus = torch.linalg.vector_norm(q, dim=dim, keepdim=True)
        b = self.bias.to(x.dtype).view(-1, *([1] * (x.dim() - dim - 1)))
        scale = torch.relu(modulus + b) / modulus.clamp_min(self.eps)
        return (q * scale).flatten(dim, dim + 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, dim={self.dim}, eps={self.eps}"
