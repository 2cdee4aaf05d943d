import math

import pytest
import torch

from quatnn.nn import QConv2d, QLinear, init


def test_polar_statistics():
    torch.manual_seed(0)
    w = init.quaternion_polar_(torch.empty(4, 400, 500), fan_in=500, fan_out=400)
    sigma = 1 / math.sqrt(2 * 500)
    sq = w.square().sum(0)
    assert sq.mean().item() == pytest.approx(4 * sigma**2, rel=0.01)
    var = w.flatten(1).var(dim=1) / sigma**2
    torch.testing.assert_close(var, torch.tensor([2, 2 / 3, 2 / 3, 2 / 3]), rtol=0.03, atol=0)
    # modulus ~ sigma * chi(4): E|w|^4 = sigma^4 * E[chi4^4] = 24 sigma^4
    assert (sq.square().mean() / sigma**4).item() == pytest.approx(24, rel=0.03)
    # axes are unit pure quaternions, uniform on the sphere (mean ~ 0, each axis^2 ~ 1/3)
    axis = w[1:] / w[1:].norm(dim=0)
    assert axis.mean(dim=(1, 2)).abs().max() < 0.01
    torch.testing.assert_close(
        axis.square().mean(dim=(1, 2)), torch.full((3,), 1 / 3), atol=0.01, rtol=0
    )


def test_glorot_sigma_and_bad_criterion():
    w = init.quaternion_polar_(torch.empty(4, 300, 300), 300, 300, "glorot")
    sigma = 1 / math.sqrt(2 * 600)
    assert w.square().sum(0).mean().item() == pytest.approx(4 * sigma**2, rel=0.02)
    with pytest.raises(ValueError, match="criterion"):
        init.quaternion_polar_(torch.empty(4, 2, 2), 2, 2, "xavier")


def test_reproducible_under_seed_and_generator():
    torch.manual_seed(3)
    a = QLinear(16, 16).weight.detach().clone()
    torch.manual_seed(3)
    b = QLinear(16, 16).weight.detach().clone()
    assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    w1 = init.quaternion_polar_(torch.empty(4, 3, 3), 3, 3, generator=g1)
    w2 = init.quaternion_polar_(torch.empty(4, 3, 3), 3, 3, generator=g2)
    assert torch.equal(w1, w2)
    assert not torch.equal(w1, init.quaternion_polar_(torch.empty(4, 3, 3), 3, 3))


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: QLinear(1024, 1024, bias=False), (2048, 1024)),
        (lambda: QConv2d(64, 64, 3, bias=False), (256, 64, 8, 8)),
    ],
)
def test_he_keeps_output_variance_twice_input(make, shape):
    torch.manual_seed(1)
    ratios = []
    for _ in range(4):
        layer = make()
        with torch.no_grad():
            y = layer(torch.randn(shape))
        ratios.append(y.var().item())
    assert sum(ratios) / len(ratios) == pytest.approx(2.0, rel=0.08)
    per_component = y.unflatten(1, (4, -1)).transpose(0, 1).flatten(1).var(dim=1)
    assert per_component.min() > 1.5 and per_component.max() < 2.5


def test_grouped_conv_he_init_counts_fan_in_per_group():
    """He: E|w|^2 = 4 sigma^2 = 2 / fan_in, fan_in = (in quaternions / groups) x kernel."""
    torch.manual_seed(0)
    layer = QConv2d(256, 256, 3, groups=16, bias=False)
    fan_in = (256 // 4 // 16) * 9
    mean_sq = layer.weight.detach().double().square().sum(0).mean().item()
    assert mean_sq == pytest.approx(2 / fan_in, rel=0.08)  # ~5 standard errors


def test_non_square_linear_he_init_uses_fan_in():
    torch.manual_seed(0)
    layer = QLinear(64, 1024, bias=False)  # 16 input quaternions, 256 output ones
    mean_sq = layer.weight.detach().double().square().sum(0).mean().item()
    assert mean_sq == pytest.approx(2 / 16, rel=0.05)
