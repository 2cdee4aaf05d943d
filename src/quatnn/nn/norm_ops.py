"""The norms' fused Triton kernels as ``torch.library`` custom ops, for ``torch.compile``.

While torch.compile traces a whiten or variance batch norm in training on a device whose
norms run the Triton kernels (:func:`quatnn.nn.norm.triton_norms`), the graph calls these
ops instead of tracing the norm as plain tensor ops: 3 kernels a pass that CUDA graphs
capture, where Inductor would fuse the plain ops but call the 4x4 Cholesky factor and
triangular solve as library kernels. Compiled, nothing raises on a non-finite batch (its
output is non-finite, as in ``nn.BatchNorm``). Triton is imported when an op first runs.

Example (in a compiled training step on CUDA; here the PyTorch ops, on the CPU):
    >>> import torch
    >>> from quatnn.nn import QBatchNorm2d
    >>> bn = torch.compile(QBatchNorm2d(8, mode="variance"))
    >>> bn(torch.randn(4, 8, 3, 3)).shape
    torch.Size([4, 8, 3, 3])
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

__all__ = ["variance", "whiten"]


def _kernels() -> ModuleType:
    """:mod:`quatnn.nn.norm_triton` (importing Triton the first time)."""
    return importlib.import_module("quatnn.nn.norm_triton")


def _output_like(x: Tensor) -> Tensor:
    """An empty tensor laid out as the kernels' output for ``x`` (fake implementations)."""
    return torch.empty_like(_kernels().taken(x))


@torch.library.custom_op("quatnn::whiten_batch", mutates_args=())
def _whiten_batch(
    x: Tensor, gm: Tensor, beta: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    y, _, cov, (mu, w, mm), _ = _kernels().whiten_forward(x, gm, beta, eps)
    return y, mu, cov, w, mm


@_whiten_batch.register_fake
def _(x: Tensor, gm: Tensor, beta: Tensor, eps: float):
    c = gm.shape[0]
    return _output_like(x), beta.new_empty(4 * c), *(gm.new_empty(c, 4, 4) for _ in range(3))


@torch.library.custom_op("quatnn::whiten_batch_backward", mutates_args=())
def _whiten_batch_backward(
    x: Tensor, dy: Tensor, mu: Tensor, w: Tensor, gm: Tensor, mm: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().whiten_backward(x, dy, (mu, w, mm), gm)


@_whiten_batch_backward.register_fake
def _(x: Tensor, dy: Tensor, mu: Tensor, w: Tensor, gm: Tensor, mm: Tensor):
    return _output_like(x), torch.empty_like(mm), torch.empty_like(mu)


def _whiten_setup(ctx, inputs, output) -> None:
    x, gm, _, _ = inputs
    _, mu, _, w, mm = output
    ctx.save_for_backward(x, mu, w, gm, mm)


def _whiten_grad(ctx, dy: Tensor, *_: Tensor):
    x, mu, w, gm, mm = ctx.saved_tensors
    dx, dgm, dbeta = _whiten_batch_backward(x, dy, mu, w, gm, mm)
    return dx, dgm, dbeta, None


_whiten_batch.register_autograd(_whiten_grad, setup_context=_whiten_setup)


@torch.library.custom_op("quatnn::variance_batch", mutates_args=())
def _variance_batch(
    x: Tensor, gamma: Tensor, beta: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, mu, sigma2, inv, _ = _kernels().variance_forward(x, gamma, beta, eps)
    return y, mu, sigma2, inv


@_variance_batch.register_fake
def _(x: Tensor, gamma: Tensor, beta: Tensor, eps: float):
    return _output_like(x), torch.empty_like(beta), torch.empty_like(gamma), torch.empty_like(gamma)


@torch.library.custom_op("quatnn::variance_batch_backward", mutates_args=())
def _variance_batch_backward(
    x: Tensor, dy: Tensor, mu: Tensor, inv: Tensor, gamma: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().variance_backward(x, dy, mu, inv, gamma)


@_variance_batch_backward.register_fake
def _(x: Tensor, dy: Tensor, mu: Tensor, inv: Tensor, gamma: Tensor):
    return _output_like(x), torch.empty_like(gamma), torch.empty_like(mu)


def _variance_setup(ctx, inputs, output) -> None:
    x, gamma, _, _ = inputs
    _, mu, _, inv = output
    ctx.save_for_backward(x, mu, inv, gamma)


def _variance_grad(ctx, dy: Tensor, *_: Tensor):
    x, mu, inv, gamma = ctx.saved_tensors
    dx, dgamma, dbeta = _variance_batch_backward(x, dy, mu, inv, gamma)
    return dx, dgamma, dbeta, None


_variance_batch.register_autograd(_variance_grad, setup_context=_variance_setup)


def whiten(x: Tensor, gm: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode whitening in the kernels (``gm`` and ``beta`` in the compute dtype):
    ``(y, mu (C, 4), cov (C, 4, 4))``, as the norm's traced form returns them."""
    y, mu, cov, _, _ = _whiten_batch(x, gm, beta, eps)
    return y, mu.detach().view(4, -1).t(), cov.detach()


def variance(x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode variance normalization in the kernels (``gamma`` and ``beta`` in the
    compute dtype): ``(y, mu (4C,), sigma^2 (C,))``, as the norm's traced form returns them."""
    y, mu, sigma2, _ = _variance_batch(x, gamma, beta, eps)
    return y, mu.detach(), sigma2.detach()
