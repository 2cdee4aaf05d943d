import copy
import functools
import pickle
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quatnn import algebra
from quatnn import functional as QF
from quatnn.nn import (
    QAdaptiveMaxPool2d,
    QBatchNorm2d,
    QConv1d,
    QConv2d,
    QConv3d,
    QConvTranspose1d,
    QConvTranspose2d,
    QConvTranspose3d,
    QDropout,
    QLinear,
    QMaxPool2d,
    QModReLU,
)

ALGOS = ("block", "rank8")
CONV = {1: QConv1d, 2: QConv2d, 3: QConv3d}
CONVT = {1: QConvTranspose1d, 2: QConvTranspose2d, 3: QConvTranspose3d}


def f64(module):
    return module.to(torch.float64)


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
def test_linear_matches_reference(algorithm, lead):
    layer = f64(QLinear(12, 8, algorithm=algorithm))
    nn.init.normal_(layer.bias)
    x = (
        torch.randn(*lead, 12, dtype=torch.float64)
        if lead
        else torch.randn(12, dtype=torch.float64)
    )
    want = algebra.reference_linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize(
    ("lead", "on_products"), [((3,), True), ((2, 1), True), ((6,), False), ((9,), False)]
)
def test_block_linear_applies_its_signs_on_the_smaller_side(monkeypatch, lead, on_products):
    """Block folds the weight (16 O I elements) unless the input has fewer rows than input
    quaternions: then its signs go on the 16 rows O products. Both sides equal the
    reference product and pass gradcheck and gradgradcheck (double backward)."""
    original, folds = QF.block_weight, []
    monkeypatch.setattr(QF, "block_weight", lambda *a: folds.append(1) or original(*a))
    x = torch.randn(*lead, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(20, dtype=torch.float64, requires_grad=True)
    y = QF.quaternion_linear(x, w, b, "block")
    assert folds == ([] if on_products else [1])
    torch.testing.assert_close(y, algebra.reference_linear(x, w, b))

    def block(*t: torch.Tensor) -> torch.Tensor:
        return QF.quaternion_linear(*t, "block")

    assert torch.autograd.gradcheck(block, (x, w, b))
    assert torch.autograd.gradgradcheck(block, (x, w, b))


# (nd, kernel, stride, padding, dilation, groups, in, out)
CONV_GRID = [
    (1, 3, 1, 0, 1, 1, 8, 12),
    (1, 4, 2, 1, 2, 2, 8, 16),
    (2, 3, 1, 1, 1, 1, 4, 8),
    (2, (3, 2), (2, 1), (1, 0), (1, 2), 2, 8, 8),
    (2, 3, 1, 1, 1, 4, 16, 16),  # quaternion depthwise
    (2, 1, 1, 0, 1, 1, 8, 4),
    (3, 2, 1, 1, 1, 1, 4, 8),
    (3, (3, 1, 2), (1, 2, 1), (1, 0, 1), 1, 2, 8, 8),
]


def _conv_input(nd, channels, size=7):
    return torch.randn(2, channels, *([size] * nd), dtype=torch.float64)


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("nd,k,s,p,d,g,cin,cout", CONV_GRID)
def test_conv_matches_reference(algorithm, nd, k, s, p, d, g, cin, cout):
    layer = f64(
        CONV[nd](cin, cout, k, stride=s, padding=p, dilation=d, groups=g, algorithm=algorithm)
    )
    nn.init.normal_(layer.bias)
    x = _conv_input(nd, cin)
    want = algebra.reference_conv(
        x,
        layer.weight,
        layer.bias,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=g,
    )
    torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize(
    "nd,k,s,p,op,d,g,cin,cout",
    [
        (1, 3, 2, 1, 1, 1, 1, 8, 4),
        (2, 3, 2, 1, 1, 1, 1, 8, 12),
        (2, (2, 3), (2, 1), (0, 1), (1, 0), (1, 2), 2, 8, 16),
        (2, 3, 1, 1, 0, 1, 2, 8, 8),
        (3, 2, 2, 0, 0, 1, 1, 4, 8),
    ],
)
def test_conv_transpose_matches_reference(algorithm, nd, k, s, p, op, d, g, cin, cout):
    layer = f64(CONVT[nd](cin, cout, k, s, p, op, g, True, d, algorithm=algorithm))
    nn.init.normal_(layer.bias)
    assert layer.weight.shape[:3] == (4, cin // 4, cout // 4 // g)
    x = _conv_input(nd, cin, 5)
    want = algebra.reference_conv(
        x,
        layer.weight,
        layer.bias,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=g,
        transposed=True,
        output_padding=layer.output_padding,
    )
    torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "options", "on_products"),
    [
        ((1, 32, 3), (4, 3, 8, 3), {"padding": 1}, True),
        ((2, 16, 3, 3), (4, 2, 4, 3, 3), {"stride": 2, "padding": 1, "dilation": 2}, True),
        ((1, 32, 2, 2, 2), (4, 3, 8, 2, 1, 2), {"padding": (1, 0, 1)}, True),
        ((1, 16, 2, 2), (4, 4, 3, 3, 3), {"stride": 2, "transposed": True, "output_padding": 1},
         True),
        ((2, 8, 6, 6), (4, 3, 2, 3, 3), {"padding": 1}, False),  # 72 positions > 2 x 9
    ],
)  # fmt: skip
def test_block_conv_applies_its_signs_on_the_smaller_side(
    monkeypatch, x_shape, w_shape, options, on_products
):
    """As the linear map: block convolutions with fewer output positions than input
    quaternions x kernel size (late layers at small batches) sum signed component
    products instead of folding the weight; both sides equal the reference."""
    original, folds = QF.block_weight, []
    monkeypatch.setattr(QF, "block_weight", lambda *a: folds.append(1) or original(*a))
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(w_shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4 * w_shape[2 if options.get("transposed") else 1], dtype=torch.float64)
    b.requires_grad_()

    def block(*t: torch.Tensor) -> torch.Tensor:
        return QF.quaternion_conv(*t, algorithm="block", **options)

    y = block(x, w, b)
    assert folds == ([] if on_products else [1])
    torch.testing.assert_close(y, algebra.reference_conv(x, w, b, **options))
    assert torch.autograd.gradcheck(block, (x, w, b))


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize(
    "padding,k,d", [("same", 4, 1), ("same", 3, 2), (2, 3, 1), ("valid", 3, 1)]
)
def test_conv_padding_modes_match_real_conv(mode, padding, k, d):
    """Fold the weight into a real nn.Conv2d with the same padding options: same output."""
    layer = f64(QConv2d(8, 8, k, padding=padding, dilation=d, padding_mode=mode))
    real = f64(nn.Conv2d(8, 8, k, padding=padding, dilation=d, padding_mode=mode))
    with torch.no_grad():
        real.weight.copy_(QF.block_weight(layer.weight))
        real.bias.copy_(layer.bias)
    x = _conv_input(2, 8, 9)
    torch.testing.assert_close(layer(x), real(x))
    if padding == "same":
        assert layer(x).shape[2:] == x.shape[2:]


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes_with_per_dimension_padding_match_real_conv(mode):
    torch.manual_seed(0)
    layer = f64(QConv2d(8, 8, (3, 5), padding=(1, 2), padding_mode=mode))
    real = f64(nn.Conv2d(8, 8, (3, 5), padding=(1, 2), padding_mode=mode))
    with torch.no_grad():
        layer.bias.normal_()
        real.weight.copy_(QF.block_weight(layer.weight))
        real.bias.copy_(layer.bias)
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    torch.testing.assert_close(layer(x), real(x))


def test_block_weight_is_left_multiplication_matrix():
    w = torch.randn(4, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(QF.block_weight(w), algebra.left_matrix(w[:, 0, 0]))


@pytest.mark.parametrize("algorithm", ALGOS)
def test_gradcheck_linear(algorithm):
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: QF.quaternion_linear(x, w, b, algorithm), (x, w, b)
    )


@pytest.mark.parametrize("transposed", [False, True])
def test_rank8_conv_over_batch_chunks_matches_reference(monkeypatch, transposed):
    """The rank-8 convolution works on chunks of the batch: 2 + 2 + 1 samples here."""
    x = torch.randn(5, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(QF, "_CHUNK_BYTES", 2 * x[0].numel() * x.element_size() // 4)
    w = torch.randn(4, 2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    kw = {"stride": 2, "padding": 1, "transposed": transposed}
    y = QF.quaternion_conv(x, w, b, algorithm="rank8", **kw)
    torch.testing.assert_close(y, algebra.reference_conv(x, w, b, **kw))
    assert torch.autograd.gradcheck(
        lambda x, w, b: QF.quaternion_conv(x, w, b, algorithm="rank8", **kw), (x, w, b)
    )


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize(
    "nd,transposed,groups",
    [
        (1, False, 2),
        (2, False, 1),
        (2, True, 2),
        (3, False, 1),
        (1, True, 1),
        (3, True, 1),
    ],
)
def test_gradcheck_conv(algorithm, nd, transposed, groups):
    x = _conv_input(nd, 8, 4).requires_grad_()
    w = torch.randn(4, 2, 2 // groups, *([2] * nd), dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    kw = {"stride": 2, "padding": 1, "groups": groups, "transposed": transposed}
    if transposed:
        kw["output_padding"] = 1
    assert torch.autograd.gradcheck(
        lambda x, w, b: QF.quaternion_conv(x, w, b, algorithm=algorithm, **kw), (x, w, b)
    )


def test_rank8_butterfly_plans_are_the_decomposition_matrices():
    """The pre-addition is G = H diag(1,-1,-1,-1) into the Q slots (order q0, q2, q1, q3),
    the post-addition H out of them, and the transposed pre-addition G^T."""
    h = torch.tensor(
        [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64
    )
    g = h * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    order = [0, 2, 1, 3]
    units = list(torch.eye(4, dtype=torch.float64))  # plane j = e_j: output c = row c

    def matrix(plan):
        return torch.stack(QF._butterfly(units, plan))

    torch.testing.assert_close(matrix(QF._PRE), g[order])
    torch.testing.assert_close(matrix(QF._POST), h[:, order])
    torch.testing.assert_close(matrix(QF._PRE_T), g[order].T)


def test_rank8_decomposition_is_the_hamilton_product():
    """a (x) b = H q + 2 r with q_k = -(G a)_k (G b)_k / 4 and r_k = a_k b_R_IN[k] into
    output component R_OUT[k], on scalar quaternions against the algebra module."""
    a, b = torch.randn(2, 4, dtype=torch.float64)
    h = torch.tensor(
        [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64
    )
    g = h * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    q = -(g @ a) * (g @ b) / 4
    r = torch.zeros(4, dtype=torch.float64)
    for k in range(4):
        r[QF._R_OUT[k]] = a[k] * b[QF._R_IN[k]]
    torch.testing.assert_close(h @ q + 2 * r, algebra.hamilton_product(a, b))


@pytest.mark.parametrize(
    ("shapes", "layer"),
    [
        (((2, 8), (4, 3, 2), 12), QF.quaternion_linear),
        (((1, 8, 3), (4, 2, 1, 2), 8), functools.partial(QF.quaternion_conv, groups=2)),
        (
            ((1, 8, 2), (4, 2, 1, 2), 8),
            functools.partial(QF.quaternion_conv, stride=2, transposed=True, groups=2),
        ),
    ],
)
def test_rank8_double_backward(shapes, layer):
    """Asked for a graph (create_graph=True: gradient penalties), rank8's backward records
    block's gradient: second derivatives pass gradgradcheck, so "auto" may pick rank8 for
    a large layer without breaking such losses."""
    torch.manual_seed(0)
    x, w, b = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes)
    rank8 = functools.partial(layer, algorithm="rank8")
    assert torch.autograd.gradgradcheck(rank8, (x, w, b))
    assert torch.autograd.gradgradcheck(lambda b: rank8(x.detach(), w.detach(), b), (b,))


def test_rank8_float32_error_is_small():
    torch.manual_seed(0)
    x, w = torch.randn(64, 1024), torch.randn(4, 256, 256) / 32
    ref = QF.quaternion_linear(x.double(), w.double(), algorithm="block")
    for algorithm in ALGOS:
        y = QF.quaternion_linear(x, w, algorithm=algorithm)
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
    xc, wc = torch.randn(4, 64, 8, 8), torch.randn(4, 16, 16, 3, 3) / 12
    ref = QF.quaternion_conv(xc.double(), wc.double(), padding=1, algorithm="block")
    y = QF.quaternion_conv(xc, wc, padding=1, algorithm="rank8")
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_auto_rule_and_override():
    small, big = torch.randn(2, 8), torch.randn(256, 4096)
    assert QF.resolve_algorithm("auto", small, 2 * 2 * 2, 2) == "block"
    assert QF.resolve_algorithm("auto", big, 256 * 1024 * 1024, 1024) == "rank8"
    assert QF.resolve_algorithm("auto", big, 256 * 1024 * 1024, 8) == "block"  # narrow
    assert QF.resolve_algorithm("auto", big, 2**20, 160) == "rank8"  # in training ...
    with torch.no_grad():
        assert QF.resolve_algorithm("auto", big, 2**20, 160) == "block"  # ... only
    assert QF.resolve_algorithm("auto", big, 2**30, 64, "conv") == "rank8"
    assert QF.resolve_algorithm("auto", big, 2**27, 16, "conv") == "rank8"
    with torch.no_grad():  # narrow convolutions gain in the backward only
        assert QF.resolve_algorithm("auto", big, 2**30, 64, "conv") == "rank8"
        assert QF.resolve_algorithm("auto", big, 2**30, 16, "conv") == "block"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert QF.resolve_algorithm("auto", big, 256 * 1024 * 1024, 1024) == "block"
    assert QF.resolve_algorithm("auto", big.half(), 256 * 1024 * 1024, 1024) == "block"
    with QF.use_algorithm("rank8"):
        assert QF.resolve_algorithm("block", small, 1, 1) == "rank8"
    assert QF.resolve_algorithm("block", small, 1, 1) == "block"
    with pytest.raises(ValueError, match="algorithm"), QF.use_algorithm("fast"):
        pass


def test_auto_rule_on_cuda():
    """On CUDA rank8 only for huge linear products (measured on an H200), and never with
    TF32 matmuls allowed. Only the device type of the input is read."""
    x = types.SimpleNamespace(device=torch.device("cuda"))
    rule = functools.partial(QF._resolve, "auto", x, kind="linear", plain=False)
    assert rule(2**34, 2048) == "rank8"
    assert rule(2**33, 2048) == "block"  # linear 4096 at batch 1024 (2**30) lost there
    assert rule(2**34, 1024) == "block"
    assert QF._resolve("auto", x, 2**36, 2048, "conv", False) == "block"
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert rule(2**34, 2048) == "block"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_auto_picks_per_layer_shape():
    """The layers pass their real sizes to the rule: wide layers get rank8 on CPU."""
    seen = []
    original = QF._resolve  # resolve_algorithm, given what the layer also needs

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    QF._resolve = spy
    try:
        QLinear(1024, 1024)(torch.randn(256, 1024))
        QLinear(64, 64)(torch.randn(256, 64))
        QConv2d(256, 256, 3, padding=1)(torch.randn(64, 256, 4, 4))  # 64 channels, 2^25 MACs
        QConv2d(256, 256, 3, padding=1, groups=4)(torch.randn(64, 256, 4, 4))  # 16 per group
    finally:
        QF._resolve = original
    assert seen == ["rank8", "block", "rank8", "block"]


def test_transposed_output_size_as_in_torch():
    """``forward(x, output_size)`` picks the output padding as nn.ConvTranspose2d does: the
    real layer with the folded weight gives the same output for every reachable size."""
    torch.manual_seed(0)
    layer = QConvTranspose2d(8, 4, 3, stride=(2, 3), padding=1, dtype=torch.float64)
    real = nn.ConvTranspose2d(8, 4, 3, stride=(2, 3), padding=1, dtype=torch.float64)
    with torch.no_grad():
        real.weight.copy_(QF.block_weight(layer.weight, transposed=True))
        real.bias.copy_(layer.bias)
    x = torch.randn(2, 8, 5, 4, dtype=torch.float64)
    for size in ([9, 10], [10, 12], [2, 4, 10, 11]):
        torch.testing.assert_close(layer(x, output_size=size), real(x, output_size=size))
    with pytest.raises(ValueError, match=r"dimension 0 must be between 9 and 10"):
        layer(x, output_size=[11, 10])


def test_transposed_output_size_reaches_every_padding_below_the_dilation():
    """With dilation > stride every output padding < dilation is valid for the op; each
    reachable size gives torch's transposed convolution with that output padding."""
    torch.manual_seed(0)
    layer = f64(QConvTranspose1d(8, 4, 3, stride=1, dilation=3))
    x = torch.randn(2, 8, 5, dtype=torch.float64)
    least = (5 - 1) * 1 + 3 * (3 - 1) + 1
    w = QF.block_weight(layer.weight, transposed=True)
    for extra in range(3):
        want = F.conv_transpose1d(x, w, layer.bias, output_padding=extra, dilation=3)
        torch.testing.assert_close(layer(x, output_size=[least + extra]), want)


def test_parameter_counts_are_a_quarter():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(QLinear(784, 300)) == 784 * 300 // 4 + 300
    assert count(QLinear(784, 300, bias=False)) * 4 == count(nn.Linear(784, 300, bias=False))
    assert count(QConv2d(64, 128, 3)) == 64 * 128 * 9 // 4 + 128
    assert count(QConv2d(64, 64, 3, groups=16, bias=False)) * 4 == count(
        nn.Conv2d(64, 64, 3, groups=16, bias=False)
    )
    assert count(QConvTranspose2d(32, 16, 4, bias=False)) * 4 == count(
        nn.ConvTranspose2d(32, 16, 4, bias=False)
    )


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: QLinear(30, 8), "in_features must be a positive multiple of 4.*got 30"),
        (lambda: QLinear(8, 6), "out_features.*got 6"),
        (lambda: QLinear(8.0, 8), r"in_features.*got 8\.0 \(float, not an integer\)"),
        (lambda: QConv2d(8, 8, 3, groups=3), r"groups must divide.*in_channels/4=2.*groups=3"),
        (lambda: QConv2d(10, 8, 3), "in_channels.*got 10"),
        (lambda: QConv2d(8, 8, 3, stride=2, padding="same"), "stride 1"),
        (lambda: QConv2d(8, 8, 3, padding_mode="mirror"), "padding_mode"),
        (lambda: QLinear(8, 8, algorithm="fast"), "algorithm"),
        (lambda: QConv2d(8, 8, 3, output_padding=1), "transposed"),
        (lambda: QConv2d(8, 8, 3, output_padding=(0, 1)), "transposed"),
        (lambda: QConv2d(8, 8, 3, stride=0), "stride must be at least 1, got 0"),
        (lambda: QConv2d(8, 8, 0), "kernel_size must be at least 1"),
        (lambda: QConv2d(8, 8, 3, dilation=(1, 0)), "dilation must be at least 1"),
        (lambda: QConv2d(8, 8, 3, padding=-1), "padding must be at least 0"),
        (lambda: QF.block_weight(torch.randn(3, 2, 2)), r"shape \(4, A, B, \*kernel\)"),
        (
            lambda: QF.quaternion_conv(
                torch.randn(1, 8, 5, 5), torch.randn(4, 3, 1, 3, 3), groups=2
            ),
            r"groups must be a positive int dividing weight.shape\[1\]=3",
        ),
    ],
)
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_zero_output_padding_is_the_default_in_any_form():
    assert QConv2d(8, 8, 3, output_padding=(0, 0)).output_padding == (0, 0)


def test_sizes_may_be_numpy_integers():
    """As in torch.nn (sizes read from arrays); stored as Python ints."""
    sizes = np.arange(4, 20, 4)  # int64
    conv, linear = QConv2d(sizes[1], sizes[3], 3), QLinear(sizes[0], sizes[2])
    assert (conv.in_channels, conv.out_channels, linear.in_features) == (8, 16, 4)
    assert type(conv.in_channels) is int and conv.weight.shape == (4, 4, 2, 3, 3)
    assert conv(torch.randn(1, 8, 5, 5)).shape == (1, 16, 3, 3)


def test_forward_shape_errors():
    with pytest.raises(ValueError, match="12 features.*in_features=8"):
        QLinear(8, 4)(torch.randn(2, 12))
    with pytest.raises(ValueError, match="12 channels.*in_channels=8"):
        QConv2d(8, 4, 3)(torch.randn(2, 12, 5, 5))
    with pytest.raises(ValueError, match="4-d input.*3-d unbatched"):
        QConv2d(8, 4, 3)(torch.randn(8, 5))
    with pytest.raises(ValueError, match="unbatched"):
        QMaxPool2d(2)(torch.randn(6, 4, 4))


@pytest.mark.parametrize(
    "layer,shape",
    [
        (QConv1d(8, 12, 3, padding=1, padding_mode="reflect"), (8, 7)),
        (QConv2d(8, 8, 3, stride=2, groups=2), (8, 7, 6)),
        (QConv3d(8, 4, 2, padding="same"), (8, 3, 4, 3)),
        (QConvTranspose2d(8, 12, 3, stride=2, output_padding=1), (8, 4, 5)),
        (QMaxPool2d(2, return_indices=True), (8, 4, 6)),
        (QAdaptiveMaxPool2d((2, 3)), (12, 5, 5)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_unbatched_input_as_in_torch(layer, shape):
    """An input without its batch axis gives the batch-of-one output without it, as torch's
    convolutions and pools do."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    layer = layer.double()
    one, batched = layer(x), layer(x.unsqueeze(0))
    for y, want in zip(*(t if isinstance(t, tuple) else (t,) for t in (one, batched)), strict=True):
        assert torch.equal(y, want.squeeze(0))


def test_unbatched_transposed_output_size():
    layer = QConvTranspose2d(8, 4, 3, stride=2)
    x = torch.randn(8, 4, 5)
    y = layer(x, output_size=(10, 12))
    assert y.shape == (4, 10, 12)
    assert torch.equal(y, layer(x.unsqueeze(0), output_size=(1, 4, 10, 12)).squeeze(0))


@pytest.mark.parametrize(
    "make,x",
    [
        (lambda: QLinear(8, 12), torch.randn(2, 8)),
        (lambda: QConv2d(8, 4, 3, groups=1, bias=False), torch.randn(1, 8, 5, 5)),
        (lambda: QConvTranspose1d(8, 8, 3, stride=2), torch.randn(1, 8, 5)),
    ],
)
def test_state_dict_round_trip(make, x):
    torch.manual_seed(0)
    a = make()
    torch.manual_seed(1)
    b = make()
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
    assert set(a.state_dict()) <= {"weight", "bias"}


def test_device_dtype_kwargs_and_extra_repr():
    layer = QConv2d(8, 16, 3, padding=1, groups=2, dtype=torch.float64, device="cpu")
    assert layer.weight.dtype == torch.float64 and layer.bias.dtype == torch.float64
    assert "groups=2" in repr(layer) and "algorithm='auto'" in repr(layer)
    assert "in_features=8" in repr(QLinear(8, 4))
    assert "init_criterion" not in repr(layer) and "fold_cache" not in repr(layer)  # defaults
    shown = repr(QLinear(8, 4, init_criterion="glorot", fold_cache=True))
    assert shown.endswith("algorithm='auto', init_criterion='glorot', fold_cache=True)")


def _assert_current(layer: QLinear, x: torch.Tensor) -> torch.Tensor:
    """The no-grad eval output of ``layer``, checked against its weight as it is now."""
    with torch.no_grad():
        y = layer(x)
    want = QF.quaternion_linear(x, layer.weight.detach(), layer.bias.detach(), "block")
    torch.testing.assert_close(y, want)
    return y


def test_fold_cache_invalidates_after_optimizer_step():
    layer = QLinear(16, 16, fold_cache=True, algorithm="block").eval()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(4, 16)
    before = _assert_current(layer, x)
    with torch.no_grad():
        cached = layer.folded_weight()
        assert cached is not None and cached is layer.folded_weight()  # reused
    layer(x).square().sum().backward()
    opt.step()
    assert not torch.allclose(before, _assert_current(layer, x))
    assert layer.folded_weight() is None  # grad mode: no cache
    with torch.no_grad():
        assert layer.train().folded_weight() is None  # train mode: no cache


def test_fold_cache_invalidates_after_fused_optimizer_step():
    """Fused optimizers bump no version counter (torch 2.14); the step count catches them,
    in eval mode throughout (fine-tuning a model kept in eval mode)."""
    torch.manual_seed(0)
    layer, x = QLinear(16, 16, fold_cache=True, algorithm="block").eval(), torch.randn(4, 16)
    before = _assert_current(layer, x)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)
    layer(x).square().sum().backward()
    version = layer.weight._version
    opt.step()
    assert layer.weight._version == version  # unseen by the version counter ...
    assert not torch.allclose(before, _assert_current(layer, x))  # ... yet not stale


def test_fold_cache_is_dropped_by_a_mode_switch():
    torch.manual_seed(0)
    layer, x = QLinear(16, 16, fold_cache=True).eval(), torch.randn(4, 16)
    _assert_current(layer, x)
    layer.train()
    layer.weight.data.mul_(2)  # bypasses the version counter
    _assert_current(layer.eval(), x)


@pytest.mark.parametrize(
    ("layer", "x"),
    [
        (QLinear(1024, 1024, fold_cache=True), torch.randn(256, 1024)),
        (QConv2d(256, 256, 3, padding=1, fold_cache=True), torch.randn(2, 256, 64, 64)),
    ],
)
def test_fold_cache_is_built_only_when_the_block_path_runs(monkeypatch, layer, x):
    """Wide layers take rank8 in inference: their cache (4x the weight) is never built."""
    layer.eval()
    folds = []
    monkeypatch.setattr(layer, "_fold", lambda: folds.append(1) or QF.block_weight(layer.weight))
    with torch.no_grad():
        y = layer(x)
        assert folds == []
        with QF.use_algorithm("block"):
            torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-4)
            layer(x)
    assert folds == [1]  # built once, then reused


@pytest.mark.parametrize(
    ("layer", "x"),
    [(QLinear(32, 32, fold_cache=True), torch.randn(2, 32)),
     (QConv2d(32, 32, 3, padding=1, fold_cache=True), torch.randn(1, 32, 2, 2))],
)  # fmt: skip
def test_large_folds_are_not_cached_for_the_products_side(monkeypatch, layer, x):
    """Calls that may take block's products side consult the fold cache only below
    CACHED_FOLD_MAX_BYTES (these layers' folds are 4 KiB and 36 KiB); above, they take the
    products side and never build the cache."""
    layer.eval()
    asked, cache = [], layer.folded_weight
    monkeypatch.setattr(layer, "folded_weight", lambda: asked.append(1) or cache())
    with torch.no_grad(), QF.use_algorithm("block"):
        monkeypatch.setitem(QF.CACHED_FOLD_MAX_BYTES, "cpu", 1024)
        y = layer(x)
        assert asked == []  # the products side, the cache never asked for
        monkeypatch.setitem(QF.CACHED_FOLD_MAX_BYTES, "cpu", 2**30)
        torch.testing.assert_close(layer(x), y)  # the cached fold: same values
        assert asked == [1]


def test_fold_cache_leaves_inference_tensors_and_functional_calls_alone():
    x = torch.randn(3, 16)
    with torch.inference_mode():
        layer = QLinear(16, 16, fold_cache=True).eval()
        torch.testing.assert_close(
            layer(x), QF.quaternion_linear(x, layer.weight, layer.bias, "block")
        )
    layers = [QLinear(16, 16, fold_cache=True).eval() for _ in range(2)]
    params, buffers = torch.func.stack_module_state(layers)
    base = copy.deepcopy(layers[0]).to("meta")

    def call(p: dict, b: dict) -> torch.Tensor:
        return torch.func.functional_call(base, (p, b), (x,))

    with torch.no_grad():
        ys = torch.func.vmap(call)(params, buffers)
        torch.testing.assert_close(ys, torch.stack([m(x) for m in layers]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cpu(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(
        QConv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        QConv2d(8, 8, 3, padding=1, groups=2),  # grouped: their bias is added apart
        QConvTranspose2d(8, 8, 3, padding=1, groups=2),
        nn.Flatten(),
        QLinear(8 * 36, 8),
    )
    x = torch.randn(2, 4, 6, 6)
    ref = model(x)
    dtypes = []
    for layer in model:
        layer.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    for algorithm in ALGOS:
        dtypes.clear()
        with QF.use_algorithm(algorithm), torch.autocast("cpu", dtype=dtype):
            y = model(x)
        assert dtypes == [dtype if algorithm == "block" else torch.float32] * len(model)
        torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
        y.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
        model.zero_grad()


def test_channels_last_input():
    layer = QConv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 6, 6)
    for algorithm in ALGOS:
        with QF.use_algorithm(algorithm):
            torch.testing.assert_close(
                layer(x.contiguous(memory_format=torch.channels_last)), layer(x)
            )


@pytest.mark.parametrize("algorithm", ALGOS)
def test_compiled_matches_eager(algorithm):
    """Also with dynamic shapes (what torch.compile switches to after a recompile); block's
    linear layer takes the products side there, its convolution folds the weight."""
    torch.manual_seed(0)
    model = nn.Sequential(
        QConv2d(16, 8, 3, padding=1, algorithm=algorithm),
        nn.ReLU(),
        nn.Flatten(),
        QLinear(8 * 4, 8, algorithm=algorithm),
    )
    x = torch.randn(2, 16, 2, 2)  # 8 positions < 4 x 9, 2 rows < 8
    compiled = torch.compile(model, dynamic=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    compiled(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


def test_compiles_to_one_graph_where_autocast_query_breaks_graphs(monkeypatch):
    """torch 2.11's torch.compile cannot trace ``torch.amp.is_autocast_available`` (a graph
    break wherever a layer or norm asks it); here it is made untraceable the same way, and
    a quaternion conv + norm + linear network must still compile to one graph."""
    monkeypatch.setattr(
        torch.amp, "is_autocast_available", torch._dynamo.disable(torch.amp.is_autocast_available)
    )
    torch._dynamo.reset()
    model = nn.Sequential(
        QConv2d(8, 8, 3, padding=1),
        QBatchNorm2d(8),
        nn.Flatten(),
        QLinear(8 * 9, 8),
    )
    explained = torch._dynamo.explain(model)(torch.randn(4, 8, 3, 3))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_mixed_network_trains():
    torch.manual_seed(0)
    model = nn.Sequential(
        QConv2d(4, 16, 3, padding=1),
        nn.ReLU(),
        QMaxPool2d(2),
        nn.Flatten(),
        QLinear(16 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 2),
    )
    x = torch.randn(64, 4, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long()  # learnable rule
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (model(x).argmax(1) == y).float().mean() > 0.95


def test_max_pool_picks_whole_quaternion_with_largest_norm():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 4, 6, dtype=torch.float64)
    y = QMaxPool2d(2)(x)
    q = algebra.to_explicit(x, 1)  # (N, C, H, W, 4)
    windows = q.unfold(2, 2, 2).unfold(3, 2, 2)  # (N, C, 2, 3, 4, 2, 2)
    windows = windows.flatten(-2)  # (N, C, 2, 3, 4, 4 positions)
    best = windows.norm(dim=4).argmax(-1, keepdim=True)
    want = windows.gather(-1, best.unsqueeze(4).expand(-1, -1, -1, -1, 4, -1)).squeeze(-1)
    torch.testing.assert_close(algebra.to_explicit(y, 1), want)
    g = QAdaptiveMaxPool2d(1)(x)
    norms = q.norm(dim=-1).flatten(2)
    idx = norms.argmax(-1)
    want = q.flatten(2, 3)[torch.arange(2)[:, None], torch.arange(3)[None], idx]
    torch.testing.assert_close(algebra.to_explicit(g, 1)[:, :, 0, 0], want)
    x.requires_grad_()
    QMaxPool2d(2)(x).sum().backward()
    assert (x.grad != 0).sum() == y.numel()


@pytest.mark.parametrize("pool", [QMaxPool2d(2), QAdaptiveMaxPool2d((2, 3))], ids=repr)
def test_max_pool_indices_unpool_whole_quaternions(pool):
    """torch's MaxUnpool, given the indices, puts each kept quaternion back where it was."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 4, 6, dtype=torch.float64)
    pool.return_indices = True
    y, where = pool(x)
    pool.return_indices = False
    assert torch.equal(y, pool(x))
    norms = algebra.to_explicit(x, 1).norm(dim=-1)  # (N, C, H, W)
    windows = norms.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)  # (N, C, 2, 3, 4)
    best = F.one_hot(windows.argmax(-1), 4).unflatten(-1, (2, 2))  # (N, C, 2, 3, 2, 2)
    keep = best.permute(0, 1, 2, 4, 3, 5).reshape(norms.shape).repeat(1, 4, 1, 1)  # blocked
    assert torch.equal(nn.MaxUnpool2d(2)(y, where), x * keep)


@pytest.mark.parametrize("return_indices", [False, True])
def test_max_pool_keeps_channels_last(return_indices):
    """As torch's pools: a channels_last input gives channels_last outputs (same values)."""
    x = torch.randn(2, 12, 6, 4).to(memory_format=torch.channels_last)
    pool = QMaxPool2d(2, return_indices=return_indices)
    got, want = pool(x), pool(x.contiguous())
    for y, ref in zip(*(t if return_indices else (t,) for t in (got, want)), strict=True):
        assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, ref)


def test_max_pool_options_follow_torch():
    args, kwargs = (3, 2, 1), {"dilation": 2, "ceil_mode": True, "return_indices": True}
    assert repr(QMaxPool2d(*args, **kwargs)) == "Q" + repr(nn.MaxPool2d(*args, **kwargs))
    with pytest.raises(RuntimeError, match="stride should not be zero"):  # not the kernel size
        QMaxPool2d(2, stride=0)(torch.randn(1, 4, 4, 4))


def test_spatial_dropout_draws_each_channel_of_a_sample_on_its_own():
    torch.manual_seed(0)
    y = QDropout(0.5, spatial=True)(torch.ones(64, 4 * 32, 3, 3))
    kept = y.unflatten(1, (4, 32)) != 0  # (N, 4, C, H, W)
    per_channel = kept[:, 0, :, 0, 0]  # (N, C)
    # constant over components and positions (one draw per sample and channel) ...
    assert torch.equal(kept, per_channel[:, None, :, None, None].expand_as(kept))
    # ... and independent across channels: about half kept, samples are never all-or-none
    assert 0.4 < per_channel.float().mean() < 0.6
    assert not (per_channel.all(1) | (~per_channel).all(1)).any()


def test_dropout_drops_whole_quaternions():
    torch.manual_seed(0)
    drop = QDropout(0.5)
    x = torch.ones(64, 4 * 32)
    y = drop(x)
    q = algebra.to_explicit(y, 1)
    zero = (q == 0).all(-1)
    assert torch.equal((q == 0).any(-1), zero)  # never a partial quaternion
    assert 0.4 < zero.float().mean() < 0.6
    assert torch.allclose(q[~zero], torch.tensor(2.0))
    drop.eval()
    assert torch.equal(drop(x), x)
    seq = QDropout(0.5, dim=-1, spatial=False)(torch.ones(3, 5, 8))
    assert torch.equal((seq.view(3, 5, 4, 2) == 0).any(2), (seq.view(3, 5, 4, 2) == 0).all(2))
    chan = QDropout(0.5, spatial=True)(torch.ones(8, 16, 3, 3))
    per_channel = algebra.to_explicit(chan, 1)
    assert torch.equal(per_channel.amin((2, 3, 4)), per_channel.amax((2, 3, 4)))
    with pytest.raises(ValueError, match="spatial=True.*axis 2 is the last"):  # nothing to span
        QDropout(0.5, dim=-1, spatial=True).eval()(torch.ones(3, 5, 8))
    x = torch.randn(3, 8, requires_grad=True)  # p=1: zeros that keep the graph, as torch
    all_dropped = QDropout(1.0)(x)
    all_dropped.sum().backward()
    assert torch.equal(all_dropped, torch.zeros_like(x))
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_modrelu():
    assert repr(QModReLU(8, dim=-1, eps=1e-4)) == "QModReLU(8, dim=-1, eps=0.0001)"
    act = QModReLU(8).double()
    x = torch.randn(5, 8, 3, dtype=torch.float64)
    torch.testing.assert_close(act(x), x)  # b = 0: identity
    with torch.no_grad():
        act.bias.fill_(-1.0)
    q, y = algebra.to_explicit(x, 1), algebra.to_explicit(act(x), 1)
    n = q.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(y, torch.relu(n - 1) * q / n)
    x.requires_grad_()
    assert torch.autograd.gradcheck(act, (x,))
    tokens = QModReLU(8, dim=-1)(torch.randn(2, 3, 8))
    assert tokens.shape == (2, 3, 8)
    with pytest.raises(ValueError, match="num_features=8"):
        act(torch.randn(2, 12))
    assert act(x.detach().bfloat16()).dtype == torch.bfloat16  # not promoted by its bias
    act.reset_parameters()  # b = 0 again (after meta-device init and to_empty, say)
    torch.testing.assert_close(act(x), x)


def test_pickles_and_copies_leave_kept_values_behind():
    """A fold kept for inference is computed again where needed, not saved with the
    module (it is 4x the weight)."""
    layer = QLinear(64, 64, fold_cache=True).eval()
    with torch.no_grad():
        y = layer(torch.ones(80, 64))  # block: the fold is kept
        assert "_kept_values" in layer.__dict__
    size = len(pickle.dumps(layer))
    assert size < len(pickle.dumps(QLinear(64, 64))) + 2000
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert "_kept_values" not in copied.__dict__
        with torch.no_grad():
            assert torch.equal(copied(torch.ones(80, 64)), y)


def test_split_activation_is_componentwise():
    x = torch.randn(3, 8)
    torch.testing.assert_close(
        algebra.to_explicit(torch.relu(x), 1), torch.relu(algebra.to_explicit(x, 1))
    )


def test_module_to_channels_last():
    model = nn.Sequential(
        QConv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        QConv2d(8, 8, 3),
        QConv2d(8, 8, 1),
    )
    x = torch.randn(2, 4, 7, 7)
    want = model(x)
    model.to(memory_format=torch.channels_last)
    assert model[0].weight[1].is_contiguous(memory_format=torch.channels_last)
    assert model[2].weight.is_contiguous(memory_format=torch.channels_last)
    assert model[4].weight.stride() == torch.empty(4, 2, 2, 1, 1).stride()  # 1x1: the same
    for algorithm in ALGOS:
        with QF.use_algorithm(algorithm):
            got = model(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        got.sum().backward()
        for layer in (model[0], model[3], model[4]):  # DDP's buckets compare these strides
            assert layer.weight.grad.stride() == layer.weight.stride()
        model.zero_grad(set_to_none=True)
    model.to(torch.float64)  # plain conversions still take the usual path
    assert model[0].weight.dtype == torch.float64


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.channels_last_3d], ids=["2d", "3d"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_module_memory_format_as_torch_conv(nd, transposed, fmt):
    """``to(memory_format=...)`` gives each weight component the strides torch's
    convolution gets, or refuses a format of the other rank as torch does."""
    layer = (CONVT if transposed else CONV)[nd](8, 16, 3, groups=1 + transposed)
    real = getattr(nn, f"Conv{'Transpose' * transposed}{nd}d")(8, 16, 3, groups=1 + transposed)
    try:
        real.to(memory_format=fmt)
    except RuntimeError:
        with pytest.raises(RuntimeError, match="rank"):
            layer.to(memory_format=fmt)
        return
    x = torch.randn(2, 8, *(5,) * nd, dtype=torch.float64)
    layer.double()
    want = layer(x)
    layer.to(memory_format=fmt)
    if nd == 1:  # torch leaves 3-d weights alone
        assert layer.weight.is_contiguous()
    else:
        strides = torch.empty(layer.weight.shape[1:]).to(memory_format=fmt).stride()
        assert all(w.stride() == strides for w in layer.weight)
    for algorithm in ALGOS:
        with QF.use_algorithm(algorithm):
            got = layer(x if nd == 1 else x.contiguous(memory_format=fmt))
        torch.testing.assert_close(got, want)
        got.sum().backward()
        assert layer.weight.grad.stride() == layer.weight.stride()  # DDP's buckets want this
        layer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_output_keeps_channels_last(algorithm, groups):
    """Like torch's convolutions, a channels_last input gives a channels_last output."""
    layer = QConv2d(8, 8, 3, padding=1, groups=groups, algorithm=algorithm)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    assert layer(x).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(x), layer(x.contiguous()))
    assert layer(x.contiguous()).is_contiguous()


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize(
    "layer, shape",
    [(lambda a: QConv2d(8, 8, 3, padding=1, algorithm=a), (0, 8, 5, 5)),
     (lambda a: QLinear(8, 8, algorithm=a), (0, 8)),
     (lambda a: QLinear(8, 8, algorithm=a), (2, 0, 8))],
)  # fmt: skip
def test_empty_batch(algorithm, layer, shape):
    layer = layer(algorithm)
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == x.shape and not layer.weight.grad.any()


@pytest.mark.parametrize("algorithm", ALGOS)
def test_input_and_weight_dtypes_must_agree_as_in_torch(algorithm):
    for layer, x in ((QLinear(8, 8, algorithm=algorithm), torch.randn(2, 8)),
                     (QConv2d(8, 8, 3, algorithm=algorithm), torch.randn(1, 8, 5, 5))):  # fmt: skip
        with pytest.raises(RuntimeError, match="type"):  # torch: "dtype" or "type"
            layer(x.double())


def test_torch_func_transforms_take_block():
    """Under torch.func, auto takes block whatever the size (the rank-8 Functions do not
    support transforms); a forced rank8 says so."""
    layer, x = QLinear(1024, 1024), torch.randn(64, 1024)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    assert QF.resolve_algorithm("auto", x, 64 * 256 * 256, 256) == "rank8"  # outside
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).sum())(params)
    with QF.use_algorithm("block"):  # what auto takes under the transforms
        layer(x).sum().backward()
        want = layer(x)
    # outside, block applies its signs to this small batch's products: sums in another order
    torch.testing.assert_close(grads["weight"], layer.weight.grad, rtol=1e-4, atol=1e-4)
    ys = torch.func.vmap(layer)(x.view(4, 16, 1024))
    torch.testing.assert_close(ys.view(64, 1024), want)
    with pytest.raises(RuntimeError, match="does not support torch.func"):
        torch.func.vmap(QLinear(8, 8, algorithm="rank8"))(torch.randn(2, 3, 8))


def test_unfolded_layers_export_with_a_dynamic_batch():
    """Under torch.export "auto" takes block without looking at sizes: no guard on the
    batch. The constant tensors that the trace builds stay out of the caches that eager
    calls use (cleared first, so that the trace is what would fill them)."""
    QF._fold_plan.cache_clear()
    model = nn.Sequential(
        QConv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), QLinear(16 * 36, 8)
    ).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.randn(3, 8, 6, 6),), dynamic_shapes=({0: batch},))
    for n in (1, 5):
        x = torch.randn(n, 8, 6, 6)
        torch.testing.assert_close(program.module()(x), model(x))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:.*deprecated")
def test_jit_trace_folds_the_weight(monkeypatch):
    """Under torch.jit.trace block folds the weight whatever the batch (no branch on it is
    recorded), and the traced layer serves other batch sizes."""
    original, folds = QF.block_weight, []
    monkeypatch.setattr(QF, "block_weight", lambda *a: folds.append(1) or original(*a))
    layer = QLinear(32, 8).eval()
    with torch.no_grad():
        traced = torch.jit.trace(layer, torch.randn(2, 32), check_trace=False)  # 2 rows < 8
        assert folds == [1]
        for n in (1, 5, 40):
            x = torch.randn(n, 32)
            torch.testing.assert_close(traced(x), layer(x))
