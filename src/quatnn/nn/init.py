"""Quaternion weight initialization (Parcollet et al., ICLR 2019).

Each quaternion weight is ``w = |w| (cos t + u sin t)`` with modulus ``|w| ~ sigma * chi(4)``,
a uniform random unit pure-quaternion axis ``u`` (a normalized Gaussian 3-vector) and phase
``t ~ U(-pi, pi)``. Then ``E|w|^2 = 4 sigma^2`` and the component variances are
``(2, 2/3, 2/3, 2/3) sigma^2``. ``sigma = 1/sqrt(2 n_in)`` ("he", default, keeps the
per-component output variance at twice the input's, like real He init before a ReLU) or
``1/sqrt(2 (n_in + n_out))`` ("glorot"), with fans in quaternion units x kernel size.

Example:
    >>> import torch
    >>> from quatnn.nn import init
    >>> w = torch.empty(4, 8, 16)
    >>> _ = init.quaternion_polar_(w, fan_in=16, fan_out=8)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["quaternion_sigma", "quaternion_polar_"]

CRITERIA = ("he", "glorot")


def quaternion_sigma(fan_in: int, fan_out: int, criterion: str = "he") -> float:
    """Scale ``sigma`` of the chi-4 modulus for fans counted in quaternion units."""
    if criterion == "he":
        return 1.0 / math.sqrt(2.0 * fan_in)
    if criterion == "glorot":
        return 1.0 / math.sqrt(2.0 * (fan_in + fan_out))
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


@torch.no_grad()
def quaternion_polar_(
    weight: Tensor,
    fan_in: int,
    fan_out: int,
    criterion: str = "he",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fill ``weight`` (leading axis of size 4: r, i, j, k) in place with the polar init."""
    if weight.shape[0] != 4:
        raise ValueError(f"weight must have a leading axis of size 4, got {tuple(weight.shape)}")
    sigma = quaternion_sigma(fan_in, fan_out, criterion)
    shape = weight.shape[1:]
    kw = {
        "dtype": torch.float32 if weight.dtype.itemsize < 4 else weight.dtype,
        "device": weight.device,
    }
    # Norms over the leading axis as sums of squared rows: linalg.vector_norm(dim=0) was
    # 10x slower on CPU, the bulk of building a quaternion ResNet-152.
    gauss = torch.empty(4, *shape, **kw).normal_(generator=generator)
    modulus = gauss.square_().sum(0).sqrt_().mul_(sigma)  # sigma * chi(4)
    axis = torch.empty(3, *shape, **kw).normal_(generator=generator)
    axis /= axis.square().sum(0).sqrt_().clamp_min_(1e-12)
    phase = torch.empty(shape, **kw).uniform_(-math.pi, math.pi, generator=generator)
    weight[0].copy_(phase.cos().mul_(modulus))
    weight[1:].copy_(axis.mul_(phase.sin_().mul_(modulus)))
    return weight
