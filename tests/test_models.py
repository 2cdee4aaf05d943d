import math

import pytest
import torch
from torch import nn

from quatnn import models
from quatnn.models.resnet import ResidualBlock
from quatnn.nn import QConv2d, QLinear, QMaxPool2d

CONVNETS = ("conv2", "conv4", "conv6")
BOTTLENECK_RESNETS = ("resnet50", "resnet101", "resnet152")
RESNETS = ("resnet20", "resnet56", "resnet18", "resnet34", *BOTTLENECK_RESNETS)
MOBILENETS = ("mobilenet_v1", "mobilenet_v2")
VGGS = ("vgg11", "vgg13", "vgg16", "vgg19")


def _forward_backward(model, shape, num_classes=10):
    """Forward a batch of 2, backpropagate, and check the output shape and every gradient."""
    torch.manual_seed(0)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, num_classes)
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def _input_shape(name, variant, size=None):
    size = size or models.spec(name).default_input_size
    return (models.default_in_channels(name, variant), *size)


# ------------------------------------------------------------------ published counts

# Iqbal & Mishra (2023), Table 1 (REFERENCES.md); quaternion CIFAR models read 4 channels.
PUBLISHED = [
    ("lenet_300_100", "real", 10, 266_610),
    ("lenet_300_100", "quaternion", 10, 67_710),
    ("conv2", "real3", 10, 4_301_642),
    ("conv2", "quaternion", 10, 1_077_962),
    ("conv4", "real3", 10, 2_425_930),
    ("conv4", "quaternion", 10, 609_226),
    ("conv6", "real3", 10, 2_262_602),
    ("conv6", "quaternion", 10, 568_778),
    ("conv4", "real3", 100, 2_449_060),
    ("conv4", "quaternion", 100, 632_356),
    ("conv6", "real3", 100, 2_285_732),
    ("conv6", "quaternion", 100, 591_908),
]


@pytest.mark.parametrize("name, variant, classes, expected", PUBLISHED)
def test_published_parameter_counts(name, variant, classes, expected):
    model = models.create(name, variant, num_classes=classes)
    assert models.count_parameters(model) == expected


def test_lenet_quaternion_reads_784_pixels_as_196_quaternions():
    model = models.create("lenet_300_100", "quaternion", in_channels=1, input_size=(28, 28))
    assert isinstance(model.fc1, QLinear) and model.fc1.weight.shape == (4, 75, 196)
    _forward_backward(model, (784,))  # flat (N, F) input
    _forward_backward(model, (1, 28, 28))  # image input, flattened


@pytest.mark.parametrize("name", CONVNETS)
def test_real4_adds_one_input_channel_of_first_convolution(name):
    real3 = models.count_parameters(models.create(name, "real3"))
    real4 = models.count_parameters(models.create(name, "real4"))
    assert real4 - real3 == 64 * 3 * 3


# ------------------------------------------------------------------ every model runs


@pytest.mark.parametrize("variant", models.VARIANTS)
# (VGG-13 and VGG-16 only repeat the layers of VGG-11 and VGG-19 more or less often: their
# configurations are checked against torchvision's below.)
@pytest.mark.parametrize(
    "name", [n for n in models.names() if n not in (*BOTTLENECK_RESNETS, "vgg13", "vgg16")]
)
def test_forward_backward_every_model_and_variant(name, variant):
    _forward_backward(models.create(name, variant), _input_shape(name, variant))


@pytest.mark.parametrize("variant", models.VARIANTS)
@pytest.mark.parametrize("name", BOTTLENECK_RESNETS)
def test_forward_backward_bottleneck_resnets(name, variant):
    # 32x32 once (quaternion ResNet-50); the others on 8x8 to keep the file fast.
    size = None if (name, variant) == ("resnet50", "quaternion") else (8, 8)
    _forward_backward(models.create(name, variant), _input_shape(name, variant, size))


def test_num_classes_100():
    _forward_backward(models.create("resnet20", "quaternion", num_classes=100), (4, 32, 32), 100)
    model = models.create("conv2", "quaternion", num_classes=100)
    assert model.head.out_features == 100


# ------------------------------------------------------------------ structure


@pytest.mark.parametrize("name", CONVNETS)
def test_quaternion_convnet_is_quaternion_except_the_head(name):
    model = models.create(name, "quaternion")
    types = [type(m) for m in model.modules()]
    assert nn.Conv2d not in types and nn.MaxPool2d not in types
    assert types.count(QConv2d) == int(name[-1])
    assert types.count(QMaxPool2d) == int(name[-1]) // 2
    assert types.count(QLinear) == 2
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [model.head]


def test_real_convnet_has_no_quaternion_layers():
    types = {type(m) for m in models.create("conv4", "real4").modules()}
    assert not types & {QConv2d, QLinear, QMaxPool2d}
    assert {nn.Conv2d, nn.Linear, nn.MaxPool2d} <= types


def test_quaternion_first_false_makes_only_the_first_layer_real():
    model = models.create("conv2", "quaternion", in_channels=3, quaternion_first=False)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, QConv2d))]
    assert [type(c) for c in convs] == [nn.Conv2d, QConv2d]
    assert convs[0].in_channels == 3
    _forward_backward(model, (3, 32, 32))
    lenet = models.create("lenet_300_100", "quaternion", input_size=(5, 5), quaternion_first=False)
    assert type(lenet.fc1) is nn.Linear and isinstance(lenet.fc2, QLinear)


@pytest.mark.parametrize("name", CONVNETS + RESNETS + VGGS + ("vit",))
def test_quaternion_has_about_a_quarter_of_real4_parameters(name):
    real4 = models.count_parameters(models.create(name, "real4"))
    quaternion = models.count_parameters(models.create(name, "quaternion"))
    assert 0.24 <= quaternion / real4 <= 0.27


@pytest.mark.parametrize("name, expected", [("mobilenet_v1", 0.268), ("mobilenet_v2", 0.287)])
def test_mobilenets_keep_a_bit_more_than_a_quarter(name, expected):
    # A quaternion depthwise kernel has as many reals as the real depthwise kernels it replaces.
    real4 = models.create(name, "real4")
    quaternion = models.create(name, "quaternion", norm="real")
    depthwise = [
        sum(m.weight.numel() for m in model.modules() if getattr(m, "groups", 1) > 1)
        for model in (real4, quaternion)
    ]
    assert depthwise[0] == depthwise[1] > 0
    ratio = models.count_parameters(quaternion) / models.count_parameters(real4)
    assert ratio == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("mode", ["whiten", "variance", "split"])
def test_quaternion_norm_option_uses_qbatchnorm(mode):
    from quatnn.nn.norm import QBatchNorm2d

    model = models.create("resnet20", "quaternion", norm=mode)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, QBatchNorm2d))]
    assert len(norms) == 19 + 2  # stem, 2 per block, 2 projection shortcuts
    assert all(type(m) is QBatchNorm2d and m.mode == mode for m in norms)


def test_real_norm_option_and_real_variants_use_batchnorm2d():
    from quatnn.nn.norm import QBatchNorm2d

    for variant, norm in (("quaternion", "real"), ("real4", "whiten"), ("real3", "variance")):
        model = models.create("mobilenet_v1", variant, width_mult=0.25, norm=norm)
        types = [type(m) for m in model.modules()]
        assert QBatchNorm2d not in types
        assert types.count(nn.BatchNorm2d) == 27  # stem + 2 per separable block


def test_mobilenet_depthwise_groups_per_variant():
    for variant, per_group in (("quaternion", 4), ("real4", 1)):
        model = models.create("mobilenet_v2", variant, width_mult=0.5, norm="real")
        grouped = [m for m in model.modules() if getattr(m, "groups", 1) > 1]
        assert len(grouped) == 17  # one depthwise convolution per inverted residual
        for conv in grouped:
            assert conv.in_channels == conv.out_channels
            assert conv.groups == conv.in_channels // per_group
            assert conv.in_channels % 8 == 0
        _forward_backward(model, (4, 32, 32))


def test_width_mult_rounds_to_multiples_of_8():
    model = models.create("mobilenet_v1", "quaternion", width_mult=0.3, norm="real")
    widths = [m.out_channels for m in model.modules() if isinstance(m, QConv2d)]
    # 32 * 0.3 = 9.6 -> 8 is 17 % short -> 16; 1024 * 0.3 = 307.2 -> 304
    assert widths[0] == 16 and widths[-1] == 304
    assert all(w % 8 == 0 for w in widths)


def test_imagenet_stem_when_small_input_false():
    model = models.create("resnet18", "quaternion", small_input=False, norm="real")
    stem_conv, pool = model.stem[0], model.stem[-1]
    assert stem_conv.kernel_size == (7, 7) and stem_conv.stride == (2, 2)
    assert isinstance(pool, QMaxPool2d)
    assert models.create("resnet18", "real3").stem[0].kernel_size == (3, 3)
    _forward_backward(model, (4, 64, 64))


def test_bottleneck_and_projection_shortcuts():
    model = models.create("resnet50", "real3")
    assert model.head.in_features == 2048
    first = model.stages[0][0]
    assert isinstance(first.shortcut[0], nn.Conv2d) and first.shortcut[0].kernel_size == (1, 1)
    assert isinstance(model.stages[0][1].shortcut, nn.Identity)


@pytest.mark.parametrize("norm", ["whiten", "real"])
def test_zero_init_residual_starts_blocks_as_identity(norm):
    model = models.create("resnet20", "quaternion", norm=norm, zero_init_residual=True)
    block = model.stages[0][0]
    assert isinstance(block, ResidualBlock) and isinstance(block.shortcut, nn.Identity)
    x = torch.relu(torch.randn(2, 16, 8, 8))
    torch.testing.assert_close(block(x), x)
    plain = models.create("resnet20", "quaternion", norm=norm).stages[0][0]
    assert not torch.allclose(plain(x), x)


# ------------------------------------------------------------------ validation


def test_unknown_model_and_variant_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid models: lenet_300_100, conv2"):
        models.create("alexnet")
    with pytest.raises(ValueError, match="valid variants: real3, real4, real, quaternion"):
        models.create("conv2", "complex")
    with pytest.raises(ValueError, match="valid models"):
        models.spec("alexnet")
    with pytest.raises(ValueError, match="valid norms"):
        models.create("resnet20", norm="layer")
    with pytest.raises(TypeError, match="valid options: small_input=True"):
        models.create("resnet20", width_mult=0.5)
    # option values have their default's type: a string "False" would pass as true
    with pytest.raises(TypeError, match="quaternion_first must be of type bool"):
        models.create("conv2", quaternion_first="False")
    with pytest.raises(TypeError, match="dim must be of type int"):
        models.create("vit", dim=64.0)
    assert models.create("mobilenet_v1", width_mult=1) is not None  # an int for a float


def test_quaternion_input_channels_must_be_divisible_by_4():
    with pytest.raises(ValueError, match="in_channels = 3 must be divisible by 4"):
        models.create("conv2", "quaternion", in_channels=3)
    with pytest.raises(ValueError, match="in_channels = 6 must be divisible by 4"):
        models.create("mobilenet_v2", "quaternion", in_channels=6)
    with pytest.raises(ValueError, match=r"in_channels\*H\*W = 729"):
        models.create("lenet_300_100", "quaternion", input_size=(27, 27))
    models.create("conv2", "real3", in_channels=5)  # real models take any count


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        models.create("conv2", num_classes=0)
    with pytest.raises(ValueError, match="too small"):
        models.create("conv6", input_size=(4, 4))
    with pytest.raises(ValueError, match="width_mult"):
        models.create("mobilenet_v1", width_mult=0)


def test_defaults_per_variant_and_spec():
    assert models.names() == [
        "lenet_300_100", "conv2", "conv4", "conv6", "resnet20", "resnet56", "resnet18",
        "resnet34", "resnet50", "resnet101", "resnet152", "vgg11", "vgg13", "vgg16", "vgg19",
        "mobilenet_v1", "mobilenet_v2", "vit",
    ]  # fmt: skip
    assert models.VARIANTS == ("real3", "real4", "real", "quaternion")
    channels = {v: models.default_in_channels("conv2", v) for v in models.VARIANTS}
    assert channels == {"real3": 3, "real4": 4, "real": 1, "quaternion": 4}
    assert models.default_in_channels("lenet_300_100", "quaternion") == 1
    lenet, conv = models.spec("lenet_300_100"), models.spec("resnet18")
    assert (lenet.input_kind, lenet.default_input_size) == ("flat", (28, 28))
    assert (conv.input_kind, conv.default_input_size) == ("image", (32, 32))
    assert conv.options["norm"] == "whiten" and conv.options["small_input"] is True
    first_conv = models.create("conv2", "real").features[0]
    assert first_conv.in_channels == 1


# ------------------------------------------------------------------ counting


def test_count_macs_by_hand():
    model = nn.Sequential(
        QConv2d(4, 8, 3, padding=1),  # 5x5 positions x 8 out x 4 in x 9 taps
        QConv2d(8, 8, 3, groups=2),  # 3x3 positions x 8 out x (8 / 2) in x 9 taps
        nn.Flatten(),
        nn.Linear(72, 10),
    )
    model.train()
    assert models.count_macs(model, (4, 5, 5)) == 25 * 8 * 4 * 9 + 9 * 8 * 4 * 9 + 72 * 10
    assert model.training  # mode restored
    # 16 real products per quaternion weight use: 2 x 1 quaternions, 9 taps, 25 positions
    assert models.count_macs(QConv2d(4, 8, 3, padding=1), (4, 5, 5)) == 16 * 2 * 1 * 9 * 25


def test_count_macs_of_a_layer_that_sees_the_batch_elsewhere():
    """A linear map on (tokens, batch, features), as seq-first attention blocks hold
    them, does tokens x in x out MACs per sample."""

    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = QLinear(8, 12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, tokens, features)
            return self.proj(x.transpose(0, 1)).transpose(0, 1)

    assert models.count_macs(SeqFirst(), (5, 8)) == 5 * 8 * 12


def test_count_macs_of_lenet_and_conv2():
    dense = 784 * 300 + 300 * 100 + 100 * 10
    for variant in ("real", "quaternion"):
        model = models.create("lenet_300_100", variant)
        assert models.count_macs(model, (784,)) == dense
    conv2 = 32 * 32 * 64 * (4 * 9 + 64 * 9) + 16 * 16 * 64 * 256 + 256 * 256 + 256 * 10
    for variant in ("real4", "quaternion"):
        assert models.count_macs(models.create("conv2", variant), (4, 32, 32)) == conv2


def test_count_parameters_counts_shared_parameters_once():
    layer = nn.Linear(4, 4)
    assert models.count_parameters(nn.Sequential(layer, layer)) == 20


def test_table_rows():
    rows = models.table(["lenet_300_100", "conv2"])
    got = {(r["name"], r["variant"]): r for r in rows}
    assert list(got) == [
        ("lenet_300_100", "real"), ("lenet_300_100", "quaternion"),
        ("conv2", "real3"), ("conv2", "real4"), ("conv2", "quaternion"),
    ]  # fmt: skip
    assert got["lenet_300_100", "quaternion"]["params"] == 67_710
    assert got["lenet_300_100", "quaternion"]["ratio_to_real"] == round(67_710 / 266_610, 4)
    assert got["conv2", "real4"]["ratio_to_real"] == 1.0
    assert got["conv2", "quaternion"]["ratio_to_real"] == round(1_077_962 / 4_302_218, 4)
    assert got["conv2", "real3"]["macs"] < got["conv2", "real4"]["macs"]
    assert set(rows[0]) == {"name", "variant", "params", "ratio_to_real", "macs"}
    only = models.table(["conv4"], ["quaternion"])
    assert len(only) == 1
    assert math.isclose(only[0]["ratio_to_real"], 609_226 / 2_426_506, abs_tol=1e-4)


@pytest.mark.parametrize("norm", ["whiten", "variance"])
def test_models_run_on_the_meta_device(norm):
    """Shape inference and deferred initialization: no autocast to switch off and no data
    to check there; every algorithm, train and eval."""
    from quatnn import functional as QF

    with torch.device("meta"):
        model = models.create("resnet20", "quaternion", norm=norm)
        x = torch.randn(2, 4, 32, 32)
    for algorithm in ("block", "rank8"):
        with QF.use_algorithm(algorithm):
            y = model.train()(x)
            assert y.is_meta and y.shape == (2, 10)
            assert model.eval()(x).shape == (2, 10)


# ---------------------------------------------------------------- models


def _copy_weights_in_order(src: nn.Module, dst: nn.Module) -> None:
    """Same architecture, same registration order: copy every parameter and buffer."""
    a, b = list(src.state_dict().values()), dst.state_dict()
    assert [tuple(t.shape) for t in a] == [tuple(t.shape) for t in b.values()]
    dst.load_state_dict(dict(zip(b, a, strict=True)))


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet18", "resnet34", *BOTTLENECK_RESNETS])
def test_imagenet_resnets_compute_what_torchvisions_compute(name):
    """ResNet-18/34 (basic blocks stride in their first 3x3) and ResNet-50/101/152
    (torchvision's v1.5: the bottleneck strides in its 3x3): same weights, same outputs."""
    import torchvision

    from quatnn import models

    torch.manual_seed(0)
    reference = _randomized(getattr(torchvision.models, name)(num_classes=10))
    ours = models.create(name, "real3", num_classes=10, small_input=False).eval()
    _copy_weights_in_order(reference, ours)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", VGGS)
def test_vgg_features_compute_what_torchvisions_vgg_bn_features_compute(name):
    """The same configuration of convolutions, batch norms and pools as torchvision's
    ``vgg*_bn`` (whose convolutions have biases: zero here, as ours have none) but for its
    last max pool; the head is the CIFAR one (Frankle & Carbin 2019: the last stage's map
    averaged): VGG-19 has 20M parameters."""
    import torchvision

    torch.manual_seed(0)
    reference = _randomized(getattr(torchvision.models, f"{name}_bn")(num_classes=10))
    ours = models.create(name, "real3", num_classes=10).eval()
    pairs = [
        (a, b)
        for kind in (nn.Conv2d, nn.BatchNorm2d)
        for a, b in zip(
            [m for m in reference.features if isinstance(m, kind)],
            [m for m in ours.features if isinstance(m, kind)],
            strict=True,
        )
    ]
    with torch.no_grad():
        for theirs, mine in pairs:
            if isinstance(theirs, nn.Conv2d):
                theirs.bias.zero_()
                mine.weight.copy_(theirs.weight)
            else:
                mine.load_state_dict(theirs.state_dict())
        x = torch.randn(2, 3, 32, 32)
        last_stage = ours.features(x)
        assert last_stage.shape[-2:] == (2, 2)  # averaged by the head's pool, not max-pooled
        torch.testing.assert_close(last_stage, reference.features[:-1](x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.pool(last_stage), last_stage.mean((2, 3), keepdim=True))
    assert ours.head.in_features == 512
    if name == "vgg19":
        assert round(models.count_parameters(ours), -6) == 20_000_000


def test_vgg_pools_round_up_so_that_28x28_images_reach_the_head():
    model = models.create("vgg11", "quaternion", in_channels=4, norm="real")
    sizes = []
    for pool in (m for m in model.features if isinstance(m, QMaxPool2d)):
        pool.register_forward_hook(lambda _m, _x, y: sizes.append(y.shape[-1]))
    _forward_backward(model, (4, 28, 28))
    assert sizes == [14, 7, 4, 2]  # four pools; the head averages the last 2x2


@pytest.mark.parametrize("width_mult", [0.5, 1.0])
def test_mobilenet_v2_computes_what_torchvisions_computes(width_mult):
    """Stage strides, widths (multiples of 8) and the 1280-channel last layer, kept at 1280
    for width_mult < 1, as torchvision's MobileNetV2 (Sandler et al. 2018)."""
    import torchvision

    from quatnn import models

    torch.manual_seed(0)
    reference = _randomized(torchvision.models.mobilenet_v2(num_classes=10, width_mult=width_mult))
    ours = models.create("mobilenet_v2", "real3", num_classes=10, width_mult=width_mult,
                         small_input=False).eval()  # fmt: skip
    _copy_weights_in_order(reference, ours)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-5)
    activations = [type(m) for m in reference.modules() if isinstance(m, nn.ReLU | nn.ReLU6)]
    assert activations == [type(m) for m in ours.modules() if isinstance(m, nn.ReLU | nn.ReLU6)]
    assert set(activations) == {nn.ReLU6}


def _block_sizes(model: nn.Module, blocks: list[nn.Module], x: torch.Tensor) -> list[int]:
    sizes = []
    handles = [b.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for b in blocks]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return sizes


def test_mobilenet_v1_strides_follow_the_paper():
    """Howard et al. 2017, Table 1 (224 input): stem 112, then 112, 56, 56, 28, 28, 14,
    14 x 5, 7, 7. Here 64 input: every size / 3.5."""
    from quatnn import models

    model = models.create("mobilenet_v1", "real3", width_mult=0.25, small_input=False)
    sizes = _block_sizes(model, list(model.features), torch.randn(1, 3, 64, 64))
    assert sizes == [32, 32, 16, 16, 8, 8, 4, 4, 4, 4, 4, 4, 2, 2]


def test_cifar_resnet_stages_work_on_32_16_8_maps():
    """He et al. 2016, sec. 4.2: the CIFAR ResNets' three stages on 32x32, 16x16, 8x8."""
    from quatnn import models

    for variant in ("real4", "quaternion"):
        model = models.create("resnet20", variant, norm="variance")
        sizes = _block_sizes(model, list(model.stages), torch.randn(2, 4, 32, 32))
        assert sizes == [32, 16, 8]


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v1", "mobilenet_v2"])
def test_quaternion_first_false_keeps_the_quaternion_stem_norm(name):
    """quaternion_first=False makes the stem convolution real (3 RGB channels); the norm
    after it stays the quaternion variant's norm."""
    from quatnn import models
    from quatnn.nn import QBatchNorm2d

    extra = {} if name == "resnet20" else {"width_mult": 0.25}
    model = models.create(name, "quaternion", in_channels=3, quaternion_first=False,
                          norm="whiten", **extra)  # fmt: skip
    stem = model.stem if name == "resnet20" else model.features[0]
    assert type(stem[0]) is nn.Conv2d and stem[0].in_channels == 3
    assert type(stem[1]) is QBatchNorm2d and stem[1].mode == "whiten"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ------------------------------------------------------------------ vision transformer


def test_vit_is_quaternion_except_the_head_and_real_variants_are_plain():
    from quatnn.nn import QLayerNorm, QMultiheadAttention, QTransformerEncoderLayer
    from quatnn.nn.attention import TransformerEncoderLayer

    model = models.create("vit", "quaternion")
    assert isinstance(model.patches, QConv2d) and model.patches.stride == (4, 4)
    assert [type(b) for b in model.blocks] == [QTransformerEncoderLayer] * 6
    assert isinstance(model.blocks[0].self_attn, QMultiheadAttention)
    assert model.blocks[0].self_attn.num_heads == 6 and model.blocks[0].norm_first
    assert isinstance(model.norm, QLayerNorm)
    assert [m for m in model.modules() if isinstance(m, nn.Linear)] == [model.head]
    real = models.create("vit", "real4")
    assert [type(b) for b in real.blocks] == [TransformerEncoderLayer] * 6
    assert not {type(m) for m in real.modules()} & {QConv2d, QLinear, QLayerNorm}
    # the position embedding is a fixed buffer, not a parameter nor state
    assert "position" not in dict(model.named_parameters())
    assert "position" not in model.state_dict()


def test_vit_position_embedding_is_the_2d_sine_cosine_one():
    from quatnn.models.vit import sincos_position_embedding

    rows, cols, dim = 3, 5, 16
    table = sincos_position_embedding(rows, cols, dim)
    quarter = dim // 4
    for token in range(rows * cols):
        r, c = divmod(token, cols)
        for k in range(quarter):
            w = 10000 ** (-k / (quarter - 1))
            want = [math.sin(c * w), math.cos(c * w), math.sin(r * w), math.cos(r * w)]
            got = [table[token, block * quarter + k].item() for block in range(4)]
            assert got == pytest.approx(want, abs=1e-6)
    model = models.create("vit", "quaternion", input_size=(8, 12), dim=16, heads=2, mlp_dim=32)
    assert torch.equal(model.position, sincos_position_embedding(2, 3, 16))


def test_vit_macs_by_hand():
    # 4 tokens of 8 features: patch conv 4 x 8 x 4 x 16 x 16; per layer q, k, v, out
    # 4 x (4 x 8 x 8), attention scores and mixing 2 x 4 x 4 x 8, feed-forward 2 x 4 x 8 x 16;
    # head 8 x 10.
    want = 4 * 8 * 4 * 256 + 4 * 4 * 64 + 2 * 4 * 4 * 8 + 2 * 4 * 8 * 16 + 80
    for variant in ("real4", "quaternion"):
        model = models.create("vit", variant, patch_size=16, dim=8, depth=1, heads=2, mlp_dim=16)
        assert models.count_macs(model, (4, 32, 32)) == want


def test_vit_bad_options_are_named():
    with pytest.raises(ValueError, match="multiple of patch_size=5"):
        models.create("vit", input_size=(32, 32), patch_size=5)
    with pytest.raises(ValueError, match="dim must be a multiple of 4"):
        models.create("vit", "real3", dim=30, heads=3)
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        models.create("vit", depth=0)
    with pytest.raises(ValueError, match="each head holds whole quaternions"):
        models.create("vit", "quaternion", dim=32, heads=16)


def test_vit_learns_the_bundled_digits(tmp_path):
    from quatnn.train import TrainConfig, train

    options = {"patch_size": 7, "dim": 64, "depth": 2, "heads": 2, "mlp_dim": 128}
    cfg = TrainConfig(model="vit", variant="quaternion", dataset="digits", options=options,
                      epochs=4, batch_size=30, lr=1e-3, device="cpu")  # fmt: skip
    summary = train(cfg, tmp_path / "run", progress="off")
    assert summary["final_test_acc"] > 0.4  # chance is 0.1
