"""Quaternion layers with ``torch.nn`` signatures (sizes in real units, blocked layout)."""

from quatnn.nn import init
from quatnn.nn.activation import QModReLU
from quatnn.nn.attention import QMultiheadAttention, QTransformerEncoderLayer
from quatnn.nn.conv import (
    QConv1d,
    QConv2d,
    QConv3d,
    QConvTranspose1d,
    QConvTranspose2d,
    QConvTranspose3d,
)
from quatnn.nn.dropout import QDropout
from quatnn.nn.linear import QLinear
from quatnn.nn.norm import (
    NonFiniteStatistics,
    QBatchNorm1d,
    QBatchNorm2d,
    QBatchNorm3d,
    QLayerNorm,
    convert_batchnorm,
)
from quatnn.nn.pooling import (
    QAdaptiveMaxPool1d,
    QAdaptiveMaxPool2d,
    QAdaptiveMaxPool3d,
    QMaxPool1d,
    QMaxPool2d,
    QMaxPool3d,
)

__all__ = [
    "init",
    "QLinear",
    "QConv1d",
    "QConv2d",
    "QConv3d",
    "QConvTranspose1d",
    "QConvTranspose2d",
    "QConvTranspose3d",
    "QBatchNorm1d",
    "QBatchNorm2d",
    "QBatchNorm3d",
    "QLayerNorm",
    "convert_batchnorm",
    "NonFiniteStatistics",
    "QModReLU",
    "QDropout",
    "QMultiheadAttention",
    "QTransformerEncoderLayer",
    "QMaxPool1d",
    "QMaxPool2d",
    "QMaxPool3d",
    "QAdaptiveMaxPool1d",
    "QAdaptiveMaxPool2d",
    "QAdaptiveMaxPool3d",
]
