"""What every weighted quaternion layer shares: size checks, init, the folded-weight cache;
and the keeping of values derived from a module's tensors (:class:`KeepsDerived`)."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from quatnn import functional as QF
from quatnn.nn import init


def quaternion_units(owner: str, name: str, value: int) -> int:
    """``value // 4`` for an integer ``value`` (any type with ``__index__``, such as
    numpy's), or a ValueError naming the argument when it is no positive multiple of 4."""
    try:
        size = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        size = None
    if size is None or size <= 0 or size % 4:
        kind = "" if size is not None else f" ({type(value).__name__}, not an integer)"
        raise ValueError(
            f"{owner}: {name} must be a positive multiple of 4 (4 real numbers per "
            f"quaternion, sizes are in real units), got {value!r}{kind}"
        )
    return size // 4


@functools.cache
def _optimizer_steps() -> list[int]:
    """``[optimizer steps taken in this process]``, counted from the first call on by a
    global step hook (one integer increment a step)."""
    steps = [0]

    def count(*_: object) -> None:
        steps[0] += 1

    register_optimizer_step_post_hook(count)
    return steps


class KeepsDerived(nn.Module):
    """A module that keeps values computed from its tensors between no-grad calls
    (:meth:`_kept`); every ``train()``/``eval()`` call drops them."""

    def train(self, mode: bool = True) -> KeepsDerived:
        """``torch.nn.Module.train``; also drops the kept values."""
        self.__dict__.pop("_kept_values", None)
        return super().train(mode)

    def __getstate__(self) -> dict:
        """The module's state without the kept values (pickles and copies stay the size of
        the parameters; the values are computed again where needed)."""
        state = dict(super().__getstate__())
        state.pop("_kept_values", None)
        return state

    def _kept(
        self, name: str, tensors: Sequence[Tensor], compute: Callable[[], Tensor], *extra: object
    ) -> Tensor | None:
        """``compute()``, kept under ``name`` and reused until one of ``tensors`` is
        replaced or updated in place (any update autograd sees: ``load_state_dict``,
        running statistics), any optimizer steps (fused optimizers update parameters without
        bumping their version counters), or ``extra`` changes; a ``train()``/``eval()`` call
        also catches edits through ``.data``, which bypass the version counters. None where
        nothing can be kept: while gradients are recorded, under torch.func transforms or
        torch.compile, and for inference tensors (no version counter)."""
        if (
            torch.is_grad_enabled()
            or QF.transforming()
            or torch.compiler.is_compiling()
            or any(t.is_inference() for t in tensors)
        ):
            return None
        steps = _optimizer_steps()[0]
        key = (*((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors), steps, *extra)
        kept = self.__dict__.setdefault("_kept_values", {})
        if name not in kept or kept[name][0] != key:
            kept[name] = (key, compute())
        return kept[name][1]


class QuaternionLayer(KeepsDerived):
    """Base of the layers holding one quaternion ``weight (4, ...)`` and a real ``bias``.

    Subclasses set ``weight``, ``bias``, ``algorithm``, ``init_criterion`` and
    ``fold_cache`` and define ``_fans()`` (fans in quaternion units x kernel size) and
    ``_fold()`` (the real weight of the equivalent real layer).
    """

    weight: Tensor
    bias: Tensor | None
    algorithm: str
    init_criterion: str
    fold_cache: bool

    def _fans(self) -> tuple[int, int]:
        raise NotImplementedError

    def _fold(self) -> Tensor:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Polar quaternion init of the weight (:mod:`quatnn.nn.init`), zero bias."""
        fan_in, fan_out = self._fans()
        init.quaternion_polar_(self.weight, fan_in, fan_out, self.init_criterion)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _options_repr(self) -> str:
        """The algorithm, and the init criterion and fold cache where not the default."""
        s = f"algorithm={self.algorithm!r}"
        if self.init_criterion != "he":
            s += f", init_criterion={self.init_criterion!r}"
        return s + (", fold_cache=True" if self.fold_cache else "")

    def _check_options(self) -> None:
        if self.algorithm not in QF.ALGORITHMS:
            raise ValueError(f"algorithm must be one of {QF.ALGORITHMS}, got {self.algorithm!r}")
        if self.init_criterion not in init.CRITERIA:
            raise ValueError(
                f"init_criterion must be one of {init.CRITERIA}, got {self.init_criterion!r}"
            )

    def folded_weight(self) -> Tensor | None:
        """The cached folded real weight when ``fold_cache`` is on, the layer is in eval
        mode and no gradient is being recorded; else ``None``.

        It is rebuilt when the weight moves and dropped by every ``train()``/``eval()``
        call (:meth:`KeepsDerived._kept`). Weights swapped in by
        ``torch.func.functional_call`` and inference tensors are never cached."""
        w = self.weight
        if not self.fold_cache or self.training or not isinstance(w, nn.Parameter):
            return None
        return self._kept("folded weight", (w,), self._fold)
