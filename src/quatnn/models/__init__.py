"""The model zoo: every architecture in real and quaternion variants from one definition.

Variants (:data:`VARIANTS`): ``real3`` / ``real4`` / ``real`` are ``torch.nn`` models
reading 3 (RGB), 4 (RGB + gray) or 1 (gray) channels; ``quaternion`` uses quatnn
quaternion layers with the same widths in real units, so it has about 1/4 of the
parameters. Every model ends in a real ``nn.Linear`` named ``head`` (class counts need not
be divisible by 4). Models: Lenet-300-100 and Conv-2/4/6 (Frankle & Carbin 2019, the
parameter counts of Iqbal & Mishra 2023), CIFAR ResNet-20/56, ResNet-18/34/50/101/152,
VGG-11/13/16/19, MobileNet v1/v2 and a small Vision Transformer (``vit``).

Example:
    >>> import torch
    >>> from quatnn import models
    >>> model = models.create("conv2", "quaternion")
    >>> model(torch.randn(2, 4, 32, 32)).shape
    torch.Size([2, 10])
    >>> models.count_parameters(model), models.count_parameters(models.create("conv2", "real3"))
    (1077962, 4301642)
"""

from quatnn.models.layers import NORMS, VARIANTS, Layers
from quatnn.models.registry import ModelSpec, create, default_in_channels, names, spec
from quatnn.models.stats import count_macs, count_parameters, table

__all__ = [
    "NORMS",
    "VARIANTS",
    "Layers",
    "ModelSpec",
    "count_macs",
    "count_parameters",
    "create",
    "default_in_channels",
    "names",
    "spec",
    "table",
]
