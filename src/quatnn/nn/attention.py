"""Multi-head attention and Transformer encoder layers, quaternion and real.

:class:`QMultiheadAttention` projects queries, keys and values with :class:`QLinear` (a
quarter of the weights) and scores a query quaternion vector ``q`` against a key ``k`` by
the real part of their quaternion inner product, ``Re(sum_c q_c conj(k_c))``, scaled by
``1/sqrt(head size in real units)``. That real part is the dot product of the 4
components, so the scores are real and softmax, masks and ``F.scaled_dot_product_attention``
apply as they are; they are unchanged when the same unit quaternion multiplies every query
and key component from the left (or from the right), as ``Re(u q conj(u k)) = Re(q conj
k)``. The attention weights mix the value quaternions (a real scalar times a quaternion).
Heads split each component block: head ``h`` of ``H`` holds quaternion channels ``h C/H ..
(h+1) C/H - 1`` of all four components, so every head sees whole quaternions.

:class:`MultiheadAttention` and :class:`TransformerEncoderLayer` are the real models'
counterparts: ``torch.nn.MultiheadAttention`` and ``torch.nn.TransformerEncoderLayer``
with separate ``nn.Linear`` projections (the same outputs for the same weights; the zoo's
real and quaternion Transformers so prune and count the same layers). The signatures and
masks follow torch: a boolean mask is True where attention is *not* allowed, a float mask
is added to the scores.

Example:
    >>> import torch
    >>> attention = QMultiheadAttention(16, num_heads=2, batch_first=True)
    >>> x = torch.randn(3, 5, 16)
    >>> out, weights = attention(x, x, x)
    >>> out.shape, weights.shape
    (torch.Size([3, 5, 16]), torch.Size([3, 5, 5]))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quatnn.nn.base import quaternion_units
from quatnn.nn.dropout import QDropout
from quatnn.nn.linear import QLinear
from quatnn.nn.norm import QLayerNorm

__all__ = [
    "MultiheadAttention",
    "QMultiheadAttention",
    "QTransformerEncoderLayer",
    "TransformerEncoderLayer",
]


def _additive(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """A torch-style mask as scores to add: ``-inf`` where a boolean mask is True."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    if not mask.is_floating_point():
        raise ValueError(f"{name} must be a bool or floating point tensor, got {mask.dtype}")
    return mask.to(dtype)


class _InProjection(nn.Linear):
    """A query, key or value projection with torch's init, also from ``reset_parameters``:
    Glorot-uniform weight, counted as one of ``stack`` stacked matrices (torch holds q, k
    and v in one ``(3E, E)`` ``in_proj_weight`` when they share the embedding size), zero
    bias."""

    def __init__(self, in_features: int, out_features: int, stack: int = 1, **kw: object):
        self.stack = stack
        super().__init__(in_features, out_features, **kw)

    def reset_parameters(self) -> None:
        fan_out, fan_in = self.weight.shape
        bound = math.sqrt(6.0 / (fan_in + self.stack * fan_out))
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class _OutProjection(nn.Linear):
    """The output projection with torch's init, also from ``reset_parameters``:
    ``nn.Linear``'s weight, zero bias."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` with separate ``nn.Linear`` projections ``q_proj``,
    ``k_proj``, ``v_proj`` and ``out_proj``: the real counterpart of
    :class:`QMultiheadAttention` (same arguments and outputs as torch's for the same
    weights; no ``add_bias_kv``/``add_zero_attn``, so the arguments after ``bias`` are
    keyword-only: a positional call written for torch's order fails instead of misplacing
    them).

    Example:
        >>> attention = MultiheadAttention(8, num_heads=2)
        >>> x = torch.randn(5, 3, 8)  # (L, N, E): batch_first=False, as in torch
        >>> attention(x, x, x, need_weights=False)[0].shape
        torch.Size([5, 3, 8])
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        *,
        batch_first: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if not isinstance(num_heads, int) or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(
                f"{owner}: num_heads must be a positive int dividing embed_dim={embed_dim}, "
                f"got {num_heads}"
            )
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"{owner}: dropout must be in [0, 1], got {dropout}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.batch_first = batch_first
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.head_dim = embed_dim // num_heads
        kw = {"bias": bias, "device": device, "dtype": dtype}
        stack = 3 if self.kdim == self.vdim == embed_dim else 1  # torch's in_proj_weight
        self.q_proj = self._projection(embed_dim, embed_dim, stack, **kw)
        self.k_proj = self._projection(self.kdim, embed_dim, stack, **kw)
        self.v_proj = self._projection(self.vdim, embed_dim, stack, **kw)
        self.out_proj = self._projection(embed_dim, embed_dim, None, **kw)

    def _projection(self, n_in: int, n_out: int, stack: int | None, **kw: object) -> nn.Module:
        """An input projection (``stack``: how many torch stacks in one matrix) or, for
        ``stack=None``, the output projection; each initializes as torch's (and again
        from its ``reset_parameters``)."""
        if stack is None:
            return _OutProjection(n_in, n_out, **kw)
        return _InProjection(n_in, n_out, stack, **kw)

    def _split_heads(self, x: Tensor) -> Tensor:
        """``(N, L, E)`` -> ``(N, H, L, E/H)``."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def _merge_heads(self, x: Tensor) -> Tensor:
        """``(N, H, L, E/H)`` -> ``(N, L, E)``."""
        return x.transpose(1, 2).flatten(2)

    def _check(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        owner = type(self).__name__
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"{owner}: query, key and value must all be 3-d (batched) or 2-d (unbatched), "
                f"got shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        for name, x, size in (("query", query, self.embed_dim), ("key", key, self.kdim),
                              ("value", value, self.vdim)):  # fmt: skip
            if x.shape[-1] != size:
                raise ValueError(f"{owner}: {name} has {x.shape[-1]} features, expected {size}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"{owner}: key and value must have the same batch and length, got "
                f"{tuple(key.shape)} and {tuple(value.shape)}"
            )
        batch = 0 if self.batch_first else 1
        if query.dim() == 3 and query.shape[batch] != key.shape[batch]:
            raise ValueError(
                f"{owner}: query and key batch sizes differ: {query.shape[batch]} and "
                f"{key.shape[batch]} (batch_first={self.batch_first})"
            )

    def _mask(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        causal: bool,
        shape: tuple[int, int, int],
        like: Tensor,
    ) -> Tensor | None:
        """One additive ``(N or 1, H or 1, L, S)`` mask from torch's masks (None if none),
        in the dtype of ``like``; ``causal``: the causal mask where ``attn_mask`` is None."""
        n, length, source = shape
        if causal and attn_mask is None:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=like.device).triu(1)
        mask = _additive(attn_mask, "attn_mask", like.dtype)
        if mask is not None:
            if mask.shape == (length, source):
                mask = mask.view(1, 1, length, source)
            elif mask.shape == (n * self.num_heads, length, source):
                mask = mask.view(n, self.num_heads, length, source)
            else:
                raise ValueError(
                    f"attn_mask must have shape (L, S) = {(length, source)} or (N*num_heads, "
                    f"L, S) = {(n * self.num_heads, length, source)}, got {tuple(mask.shape)}"
                )
        padding = _additive(key_padding_mask, "key_padding_mask", like.dtype)
        if padding is not None:
            if padding.shape != (n, source):
                raise ValueError(
                    f"key_padding_mask must have shape (N, S) = {(n, source)}, got "
                    f"{tuple(padding.shape)}"
                )
            padding = padding.view(n, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``(output, weights)`` as ``torch.nn.MultiheadAttention`` returns them: weights
        (after dropout) averaged over heads unless ``average_attn_weights`` is False, None
        unless ``need_weights``. ``is_causal`` applies the causal mask when ``attn_mask``
        is None (and takes ``attn_mask`` as that mask otherwise)."""
        self._check(query, key, value)
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q = self._split_heads(self.q_proj(query))
        k = self._split_heads(self.k_proj(key))
        v = self._split_heads(self.v_proj(value))
        n, _, length, _ = q.shape
        # the fused kernel applies a causal mask alone itself; anything else gets one mask
        fused_causal = is_causal and attn_mask is None and key_padding_mask is None
        fused_causal = fused_causal and not need_weights
        causal = is_causal and not fused_causal
        mask = self._mask(attn_mask, key_padding_mask, causal, (n, length, k.shape[2]), q)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(-1), p)
            y = weights @ v
            if average_attn_weights:
                weights = weights.mean(1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            y = F.scaled_dot_product_attention(q, k, v, mask, dropout_p=p, is_causal=fused_causal)
        out = self.out_proj(self._merge_heads(y))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}"
        s += f", batch_first={self.batch_first}"
        if (self.kdim, self.vdim) != (self.embed_dim, self.embed_dim):
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        return s


class QMultiheadAttention(MultiheadAttention):
    """Quaternion multi-head attention (module docstring): :class:`QLinear` projections,
    scores ``Re(sum_c q_c conj(k_c)) / sqrt(E/H)``, heads of whole quaternions.

    Sizes are in real units: ``embed_dim``, ``kdim`` and ``vdim`` multiples of 4, and
    ``embed_dim / num_heads`` too (each head holds whole quaternions). ``algorithm`` and
    ``init_criterion`` go to every projection (:class:`QLinear`; Glorot by default, as
    torch initializes its attention). Inputs and outputs are blocked on the last axis.

    Example:
        >>> attention = QMultiheadAttention(16, 2, batch_first=True)
        >>> attention.q_proj.weight.shape  # a quarter of nn.MultiheadAttention's
        torch.Size([4, 4, 4])
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        *,
        batch_first: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        algorithm: str = "auto",
        init_criterion: str = "glorot",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        for name, size in (("embed_dim", embed_dim), ("kdim", kdim), ("vdim", vdim)):
            if size is not None:
                quaternion_units("QMultiheadAttention", name, size)
        if isinstance(num_heads, int) and num_heads > 0 and embed_dim % (4 * num_heads):
            raise ValueError(
                f"QMultiheadAttention: embed_dim / num_heads must be a multiple of 4 (each head "
                f"holds whole quaternions), got embed_dim={embed_dim}, num_heads={num_heads}"
            )
        self._options = {"algorithm": algorithm, "init_criterion": init_criterion}
        super().__init__(
            embed_dim,
            num_heads,
            dropout,
            bias,
            batch_first=batch_first,
            kdim=kdim,
            vdim=vdim,
            device=device,
            dtype=dtype,
        )

    def _projection(self, n_in: int, n_out: int, stack: int | None, **kw: object) -> nn.Module:
        """A :class:`QLinear`: its polar init, zero bias."""
        return QLinear(n_in, n_out, **kw, **self._options)

    def _split_heads(self, x: Tensor) -> Tensor:
        """Blocked ``(N, L, 4C)`` -> ``(N, H, L, 4C/H)``, each head blocked: its C/H
        quaternions' r parts, then i, j, k parts."""
        return x.unflatten(-1, (4, self.num_heads, -1)).permute(0, 3, 1, 2, 4).flatten(3)

    def _merge_heads(self, x: Tensor) -> Tensor:
        """``(N, H, L, 4C/H)`` -> blocked ``(N, L, 4C)``."""
        return x.unflatten(-1, (4, -1)).permute(0, 2, 3, 1, 4).flatten(2)


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu}


class TransformerEncoderLayer(nn.Module):
    """``torch.nn.TransformerEncoderLayer`` (self-attention, then a feed-forward block, each
    with a residual connection and layer norm, before it with ``norm_first``) built from
    :class:`MultiheadAttention`: the real counterpart of :class:`QTransformerEncoderLayer`.
    It stacks with ``torch.nn.TransformerEncoder(layer, num_layers,
    enable_nested_tensor=False)`` or an ``nn.Sequential``.

    Example:
        >>> layer = TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
        >>> layer(torch.randn(3, 5, 8)).shape
        torch.Size([3, 5, 8])
    """

    _attention: Callable[..., MultiheadAttention] = MultiheadAttention
    _linear: Callable[..., nn.Module] = nn.Linear
    _norm: Callable[..., nn.Module] = nn.LayerNorm
    _dropout: Callable[[float], nn.Module] = nn.Dropout

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(activation, str):
            if activation not in _ACTIVATIONS:
                raise ValueError(
                    f"activation must be one of {tuple(_ACTIVATIONS)} or a callable, got "
                    f"{activation!r}"
                )
            activation = _ACTIVATIONS[activation]
        kw = {"device": device, "dtype": dtype}
        self.self_attn = self._attention(
            d_model, nhead, dropout, bias=bias, batch_first=batch_first, **kw
        )
        self.linear1 = self._linear(d_model, dim_feedforward, bias=bias, **kw)
        self.dropout = self._dropout(dropout)
        self.linear2 = self._linear(dim_feedforward, d_model, bias=bias, **kw)
        self.norm_first = norm_first
        self.norm1 = self._norm(d_model, eps=layer_norm_eps, bias=bias, **kw)  # as torch
        self.norm2 = self._norm(d_model, eps=layer_norm_eps, bias=bias, **kw)
        self.dropout1 = self._dropout(dropout)
        self.dropout2 = self._dropout(dropout)
        self.activation = activation

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """The encoded ``src``; the masks are :class:`MultiheadAttention`'s."""
        x = src
        if self.norm_first:
            x = x + self._attend(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._feed_forward(self.norm2(x))
        x = self.norm1(x + self._attend(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._feed_forward(x))

    def _attend(
        self, x: Tensor, mask: Tensor | None, padding: Tensor | None, is_causal: bool
    ) -> Tensor:
        y = self.self_attn(x, x, x, padding, False, mask, is_causal=is_causal)[0]
        return self.dropout1(y)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class QTransformerEncoderLayer(TransformerEncoderLayer):
    """Quaternion Transformer encoder layer: :class:`QMultiheadAttention`, a feed-forward
    block of two :class:`QLinear` with a split activation (``relu``/``gelu`` act on each
    component), :class:`~quatnn.nn.QLayerNorm` and :class:`~quatnn.nn.QDropout` of whole
    quaternions; torch's signature, sizes in real units (multiples of 4), inputs blocked on
    the last axis. About a quarter of the parameters of ``torch.nn.TransformerEncoderLayer``.

    Example:
        >>> layer = QTransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
        >>> encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        >>> encoder(torch.randn(3, 5, 16)).shape
        torch.Size([3, 5, 16])
    """

    _attention = QMultiheadAttention
    _linear = QLinear
    _norm = QLayerNorm
    _dropout = functools.partial(QDropout, dim=-1)
