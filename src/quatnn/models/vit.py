"""A small Vision Transformer (Dosovitskiy et al. 2021) for 32x32 images.

Non-overlapping ``patch_size`` patches are embedded by a strided convolution (a
quaternion one in the quaternion variant: each patch's RGB + gray pixels are quaternions),
the fixed 2-d sine-cosine position embedding is added, ``depth`` pre-norm encoder layers
(multi-head self-attention, GELU feed-forward) follow, and the tokens are averaged after a
final layer norm for the real ``head``: the "simple ViT" of Beyer, Zhai & Kolesnikov
(2022, "Better plain ViT baselines for ImageNet-1k"), their choices for a ViT trained on
ImageNet-1k alone. The position embedding has no parameters, so the quaternion model
keeps about a quarter of the real one's. The quaternion variant uses
:class:`~quatnn.nn.QTransformerEncoderLayer`, :class:`~quatnn.nn.QLayerNorm` and whole-
quaternion dropout; the real ones use torch's encoder layer with ``nn.Linear``
projections, so both prune and count the same layers. In the blocked layout the position
embedding gives quaternion channel ``c`` of the token at ``(row, col)`` the quaternion
``(sin col w_c, cos col w_c, sin row w_c, cos row w_c)``.

Example:
    >>> import torch
    >>> model = vit("quaternion", 10, in_channels=4, input_size=(32, 32), dim=32, depth=1,
    ...             heads=2, mlp_dim=64)
    >>> model(torch.randn(2, 4, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quatnn.models.layers import Layers, check_positive

__all__ = ["VisionTransformer", "sincos_position_embedding", "vit"]


def sincos_position_embedding(rows: int, cols: int, dim: int) -> Tensor:
    """``(rows * cols, dim)``: for the token at ``(r, c)`` (row-major) and frequencies
    ``w_k = 10000^(-k / (dim/4 - 1))``, ``k < dim/4``, the four blocks ``sin(c w)``,
    ``cos(c w)``, ``sin(r w)``, ``cos(r w)`` (Beyer et al. 2022); ``dim`` divisible by 4.

    >>> sincos_position_embedding(2, 3, 8).shape
    torch.Size([6, 8])
    """
    if dim % 4:
        raise ValueError(f"sincos_position_embedding: dim must be divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 10000.0 ** -(torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1))
    r, c = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64),
        torch.arange(cols, dtype=torch.float64),
        indexing="ij",
    )
    c, r = c.reshape(-1, 1) * omega, r.reshape(-1, 1) * omega
    return torch.cat([c.sin(), c.cos(), r.sin(), r.cos()], dim=1).float()


class VisionTransformer(nn.Module):
    """``patches`` (strided convolution), the ``position`` buffer, ``dropout``, ``blocks``,
    ``norm``, then the mean token through ``head``. Built by :func:`vit`."""

    def __init__(
        self,
        layers: Layers,
        num_classes: int,
        in_channels: int,
        grid: tuple[int, int],
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        dropout: float,
        quaternion_first: bool,
    ) -> None:
        super().__init__()
        embed = layers.first(quaternion_first)
        self.patches = embed.conv(in_channels, dim, patch_size, stride=patch_size)
        self.register_buffer("position", sincos_position_embedding(*grid, dim), persistent=False)
        self.dropout = layers.dropout(dropout)
        self.blocks = nn.Sequential(
            *(layers.encoder_layer(dim, heads, mlp_dim, dropout) for _ in range(depth))
        )
        self.norm = layers.layer_norm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)  # (N, tokens, dim), blocked
        tokens = self.blocks(self.dropout(tokens + self.position))
        return self.head(self.norm(tokens).mean(1))


def vit(
    variant: str,
    num_classes: int,
    in_channels: int,
    input_size: tuple[int, int],
    *,
    patch_size: int = 4,
    dim: int = 192,
    depth: int = 6,
    heads: int = 6,
    mlp_dim: int = 384,
    dropout: float = 0.0,
    quaternion_first: bool = True,
) -> VisionTransformer:
    """The Vision Transformer of the module docstring, widths in real units: ``dim``
    divisible by 4 (and by ``4 heads`` in the quaternion variant, ``mlp_dim`` too); the
    image sides must be multiples of ``patch_size``."""
    for name, value in (("patch_size", patch_size), ("dim", dim), ("depth", depth),
                        ("heads", heads), ("mlp_dim", mlp_dim)):  # fmt: skip
        check_positive(value, f"vit: {name}")
    if dim % 4:
        raise ValueError(f"vit: dim must be a multiple of 4 (4 sine-cosine blocks), got {dim}")
    if any(side % patch_size for side in input_size):
        raise ValueError(
            f"vit: input_size {tuple(input_size)} must be a multiple of patch_size={patch_size} "
            "on each side"
        )
    grid = (input_size[0] // patch_size, input_size[1] // patch_size)
    return VisionTransformer(
        Layers.for_variant(variant), num_classes, in_channels, grid, patch_size, dim, depth,
        heads, mlp_dim, dropout, quaternion_first,
    )  # fmt: skip
