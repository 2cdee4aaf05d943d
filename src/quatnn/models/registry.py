"""The model registry: names, specs and :func:`create`.

Example:
    >>> from quatnn import models
    >>> models.spec("conv4").default_input_size
    (32, 32)
    >>> model = models.create("conv4", "quaternion", num_classes=100)
    >>> models.count_parameters(model)
    632356
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from torch import nn

from quatnn.models.convnets import convnet
from quatnn.models.layers import VARIANTS, check_positive
from quatnn.models.lenet import lenet_300_100
from quatnn.models.mobilenet import mobilenet_v1, mobilenet_v2
from quatnn.models.resnet import resnet
from quatnn.models.vgg import vgg
from quatnn.models.vit import vit

__all__ = ["ModelSpec", "create", "default_in_channels", "names", "spec"]

_VARIANT_CHANNELS = {"real3": 3, "real4": 4, "real": 1, "quaternion": 4}


@dataclass(frozen=True)
class ModelSpec:
    """What a model reads and which options :func:`create` accepts for it.

    ``input_kind`` is ``"flat"`` (a vector; images are flattened) or ``"image"``
    ``(N, C, H, W)``; ``default_input_size`` is ``(H, W)``; ``options`` maps each option
    name to its default.
    """

    name: str
    input_kind: str
    default_input_size: tuple[int, int]
    description: str
    options: dict[str, object] = field(hash=False)

    @property
    def real_variant(self) -> str:
        """The real variant the quaternion one is measured against: ``real`` for flat
        input (the same pixels, one channel), else ``real4`` (the same 4 channels)."""
        return "real" if self.input_kind == "flat" else "real4"


def _entry(
    name: str, kind: str, size: tuple[int, int], description: str, builder: Callable[..., nn.Module]
) -> tuple[str, tuple[ModelSpec, Callable[..., nn.Module]]]:
    options = {
        p.name: p.default
        for p in inspect.signature(builder).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    return name, (ModelSpec(name, kind, size, description, options), builder)


_CIFAR = (32, 32)
_REGISTRY: dict[str, tuple[ModelSpec, Callable[..., nn.Module]]] = dict(
    [
        _entry("lenet_300_100", "flat", (28, 28), "MLP 300-100 (Frankle & Carbin 2019)",
               lenet_300_100),
        _entry("conv2", "image", _CIFAR, "2 conv + FC 256-256 (Frankle & Carbin 2019)",
               partial(convnet, 2)),
        _entry("conv4", "image", _CIFAR, "4 conv + FC 256-256 (Frankle & Carbin 2019)",
               partial(convnet, 4)),
        _entry("conv6", "image", _CIFAR, "6 conv + FC 256-256 (Frankle & Carbin 2019)",
               partial(convnet, 6)),
        _entry("resnet20", "image", _CIFAR, "CIFAR ResNet, 3x3 basic blocks, 16-32-64",
               partial(resnet, "resnet20")),
        _entry("resnet56", "image", _CIFAR, "CIFAR ResNet, 9x3 basic blocks, 16-32-64",
               partial(resnet, "resnet56")),
        _entry("resnet18", "image", _CIFAR, "ResNet-18, basic blocks, 64-512",
               partial(resnet, "resnet18")),
        _entry("resnet34", "image", _CIFAR, "ResNet-34, basic blocks, 64-512",
               partial(resnet, "resnet34")),
        _entry("resnet50", "image", _CIFAR, "ResNet-50, bottleneck blocks, 256-2048",
               partial(resnet, "resnet50")),
        _entry("resnet101", "image", _CIFAR, "ResNet-101, bottleneck blocks, 256-2048",
               partial(resnet, "resnet101")),
        _entry("resnet152", "image", _CIFAR, "ResNet-152, bottleneck blocks, 256-2048",
               partial(resnet, "resnet152")),
        *(_entry(name, "image", _CIFAR, f"VGG-{name[3:]} with batch norm, one linear head",
                 partial(vgg, name)) for name in ("vgg11", "vgg13", "vgg16", "vgg19")),
        _entry("mobilenet_v1", "image", _CIFAR, "MobileNet v1, depthwise separable, ReLU",
               mobilenet_v1),
        _entry("mobilenet_v2", "image", _CIFAR, "MobileNet v2, inverted residuals, ReLU6",
               mobilenet_v2),
        _entry("vit", "image", _CIFAR, "Vision Transformer, 4x4 patches, 6 layers, 192 wide",
               vit),
    ]
)  # fmt: skip


def names() -> list[str]:
    """Registered model names.

    >>> names()[:4]
    ['lenet_300_100', 'conv2', 'conv4', 'conv6']
    """
    return list(_REGISTRY)


def spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name`` (ValueError listing the names if unknown)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(_REGISTRY)}")
    return _REGISTRY[name][0]


def default_in_channels(name: str, variant: str) -> int:
    """Input channels :func:`create` assumes: 3 (``real3``), 4 (``real4``), 1 (``real``),
    4 (``quaternion``: RGB + gray, one quaternion per pixel), except 1 for the quaternion
    variant of a flat model (a grayscale image whose pixels are grouped into quaternions).

    >>> [default_in_channels(name, "quaternion") for name in ("conv2", "lenet_300_100")]
    [4, 1]
    """
    _check_variant(variant)
    if variant == "quaternion" and spec(name).input_kind == "flat":
        return 1
    return _VARIANT_CHANNELS[variant]


def _check_option_type(name: str, key: str, value: object, default: object) -> None:
    """TypeError unless ``value`` has the type of the option's ``default`` (an int for a
    float is fine): a string such as ``"False"`` would otherwise pass as true."""
    if default is None:
        return
    kind = type(default)
    if type(value) not in ((int, float) if kind is float else (kind,)):  # (a bool no int)
        hint = " (booleans are true or false)" if kind is bool else ""
        raise TypeError(
            f"{name}: option {key} must be of type {kind.__name__}, as its default "
            f"{default!r}, got {value!r}{hint}"
        )


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")


def create(
    name: str,
    variant: str = "quaternion",
    num_classes: int = 10,
    in_channels: int | None = None,
    input_size: tuple[int, int] | None = None,
    **options: object,
) -> nn.Module:
    """Build model ``name`` in ``variant`` (one of :data:`VARIANTS`).

    Widths are in real units and the same for every variant; the quaternion variant uses
    quaternion layers everywhere except the classifier ``head``, a real ``nn.Linear`` on the
    4C features. ``in_channels`` defaults by variant (:func:`default_in_channels`),
    ``input_size`` ``(H, W)`` to the model's ``default_input_size``: the fully connected
    sizes of flat models and Conv-N depend on it. ``options`` are the model's own
    (``spec(name).options``); every model has ``quaternion_first=True``: with ``False``
    the quaternion variant's first layer is real, so it reads any number of channels.

    >>> import torch
    >>> create("lenet_300_100", "real")(torch.randn(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    model_spec = spec(name)
    builder = _REGISTRY[name][1]
    _check_variant(variant)
    if in_channels is None:
        in_channels = default_in_channels(name, variant)
    check_positive(num_classes, "num_classes")
    check_positive(in_channels, "in_channels")
    size = tuple(model_spec.default_input_size if input_size is None else input_size)
    if len(size) != 2:
        raise ValueError(f"input_size must be (H, W), got {input_size!r}")
    for side in size:
        check_positive(side, "input_size")
    unknown = sorted(set(options) - set(model_spec.options))
    if unknown:
        raise TypeError(
            f"{name}: unknown option(s) {', '.join(unknown)}; valid options: "
            f"{', '.join(f'{k}={v!r}' for k, v in model_spec.options.items())}"
        )
    for key, value in options.items():
        _check_option_type(name, key, value, model_spec.options[key])
    if variant == "quaternion" and options.get("quaternion_first", True):
        flat = model_spec.input_kind == "flat"
        real_inputs = in_channels * size[0] * size[1] if flat else in_channels
        if real_inputs % 4:
            what = f"in_channels*H*W = {real_inputs}" if flat else f"in_channels = {in_channels}"
            raise ValueError(
                f"the quaternion {name} reads 4 reals per quaternion, so {what} must be "
                f"divisible by 4 (use a 4-channel encoding such as rgb_gray, or "
                f"quaternion_first=False for a real first layer)"
            )
    return builder(variant, num_classes, in_channels, size, **options)
