"""Quaternion fully connected layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quatnn import functional as QF
from quatnn.nn.base import QuaternionLayer, quaternion_units


class QLinear(QuaternionLayer):
    """``y = W (x) x + b`` on the last axis, sizes in real units (like ``nn.Linear``).

    ``QLinear(784, 300)`` maps 196 input quaternions to 75 output quaternions with
    ``weight`` of shape ``(4, 75, 196)`` (a quarter of ``nn.Linear(784, 300)``'s weights)
    and a real ``bias`` of size 300.

    Args:
        in_features, out_features: real sizes, multiples of 4.
        bias: learn a real bias of size ``out_features``.
        algorithm: ``"auto"``, ``"block"`` or ``"rank8"`` (:mod:`quatnn.functional`).
        init_criterion: ``"he"`` or ``"glorot"`` (:mod:`quatnn.nn.init`).
        fold_cache: in eval mode under ``torch.no_grad()``, reuse the folded real weight
            between calls that take the block path (built on the first such call;
            :meth:`~quatnn.nn.base.QuaternionLayer.folded_weight`; small batches skip a
            large one, :data:`quatnn.functional.CACHED_FOLD_MAX_BYTES`).

    Example:
        >>> layer = QLinear(8, 12)
        >>> layer(torch.randn(3, 8)).shape
        torch.Size([3, 12])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        algorithm: str = "auto",
        init_criterion: str = "he",
        fold_cache: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        q_in = quaternion_units("QLinear", "in_features", in_features)
        q_out = quaternion_units("QLinear", "out_features", out_features)
        self.in_features, self.out_features = 4 * q_in, 4 * q_out
        self.algorithm, self.init_criterion, self.fold_cache = algorithm, init_criterion, fold_cache
        self._check_options()
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(4, q_out, q_in, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def _fans(self) -> tuple[int, int]:
        return self.weight.shape[2], self.weight.shape[1]

    def _fold(self) -> Tensor:
        return QF.block_weight(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return QF.quaternion_linear(x, self.weight, self.bias, self.algorithm, self.folded_weight)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._options_repr()}"
        )
