"""Tests for quaternion batch/layer normalization (quatnn.nn.norm)."""

from __future__ import annotations

import copy
import itertools
import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from quatnn.algebra import hamilton_product, normalize, to_blocked, to_explicit
from quatnn.nn.norm import (
    NonFiniteStatistics,
    QBatchNorm1d,
    QBatchNorm2d,
    QBatchNorm3d,
    QLayerNorm,
    convert_batchnorm,
)

MODES = ("whiten", "variance", "split")
TRIU = torch.triu_indices(4, 4)


def samples(x: torch.Tensor) -> torch.Tensor:
    """Blocked (N, 4C, *S) -> (C, N*prod(S), 4): every quaternion sample per channel."""
    q = to_explicit(x, 1)  # (N, C, *S, 4)
    c = q.shape[1]
    return q.movedim(1, 0).reshape(c, -1, 4)


def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel mean (C, 4) and biased covariance (C, 4, 4) of a blocked tensor."""
    q = samples(x)
    mu = q.mean(1)
    d = q - mu.unsqueeze(1)
    return mu, d.mT @ d / q.shape[1]


def correlated(n: int, c: int, spatial: tuple[int, ...] = (), cond: float = 1e3, seed: int = 0):
    """Blocked float64 input whose channels have random mean and a covariance with
    condition number ``cond`` (random rotation, eigenvalues log-spaced from ``cond`` to 1)."""
    g = torch.Generator().manual_seed(seed)
    eig = torch.logspace(math.log10(cond), 0.0, 4, dtype=torch.float64)
    rot, _ = torch.linalg.qr(torch.randn(c, 4, 4, generator=g, dtype=torch.float64))
    mix = rot * eig.sqrt()  # cov = rot diag(eig) rot^T
    z = torch.randn(n, c, *spatial, 4, generator=g, dtype=torch.float64)
    q = torch.einsum("cab,nc...b->nc...a", mix, z) + 5 * torch.randn(c, 4, generator=g).view(
        c, *([1] * len(spatial)), 4
    ).to(torch.float64)
    return to_blocked(q, 1).contiguous(), rot @ torch.diag_embed(eig) @ rot.mT


def gamma_matrix(weight: torch.Tensor) -> torch.Tensor:
    c = weight.shape[0]
    g = torch.zeros(c, 4, 4, dtype=weight.dtype)
    g[:, TRIU[0], TRIU[1]] = weight
    g[:, TRIU[1], TRIU[0]] = weight
    return g


def reference_whiten(x, gamma, beta, mean=None, cov=None, eps=1e-5):
    """Obvious whitening: per channel y = Gamma L^-1 (x - mu) + beta, V = L L^T."""
    q = samples(x)
    if mean is None:
        mean, cov = stats(x)
    chol = torch.linalg.cholesky(cov + eps * torch.eye(4, dtype=cov.dtype))
    w = torch.linalg.inv(chol)
    y = torch.einsum("cab,cnb->cna", gamma @ w, q - mean.unsqueeze(1)) + beta.unsqueeze(1)
    # back to blocked (N, 4C, *S)
    n = x.shape[0]
    spatial = x.shape[2:]
    yq = y.reshape(y.shape[0], n, *spatial, 4).movedim(0, 1)
    return to_blocked(yq, 1)


def randomize(bn: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bn.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---------------------------------------------------------------------------------------
# whitening
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cond", [1e2, 1e3])
def test_whiten_output_covariance_is_quarter_identity_at_init(cond):
    x, true_cov = correlated(256, 3, (4, 4), cond=cond)
    # the input really is strongly correlated and anisotropic
    _, cov_in = stats(x)
    assert torch.linalg.cond(cov_in).min() > cond / 3
    bn = QBatchNorm2d(12).double()
    y = bn(x)
    mu, cov = stats(y)
    torch.testing.assert_close(
        cov, 0.25 * torch.eye(4, dtype=torch.float64).expand(3, 4, 4), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(mu, torch.zeros(3, 4, dtype=torch.float64), atol=1e-10, rtol=0)


def test_whiten_random_gamma_gives_gamma_gamma_t_and_mean_beta():
    x, _ = correlated(128, 2, (3, 5), cond=500.0, seed=3)
    bn = QBatchNorm2d(8).double()
    randomize(bn)
    gm = gamma_matrix(bn.weight.detach())
    assert (gm - gm.mT).abs().max() == 0 and (gm - 0.5 * torch.eye(4)).abs().max() > 0.1
    y = bn(x)
    mu, cov = stats(y)
    torch.testing.assert_close(cov, gm @ gm.mT, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mu.t().reshape(-1), bn.bias.detach(), atol=1e-10, rtol=0)
    # and matches the obvious reference implementation sample by sample
    ref = reference_whiten(x, gm, bn.bias.detach().view(4, 2).t())
    torch.testing.assert_close(y, ref, atol=1e-9, rtol=1e-9)


def test_whiten_float32_on_offset_data():
    x, _ = correlated(64, 4, (8, 8), cond=1e3, seed=5)
    x = (x + 100.0).float()  # large mean: naive E[xx^T] - mu mu^T would cancel badly
    y = QBatchNorm2d(16)(x)
    mu, cov = stats(y.double())
    torch.testing.assert_close(
        cov, 0.25 * torch.eye(4, dtype=torch.float64).expand(4, 4, 4), atol=2e-4, rtol=0
    )
    # centred on the refined mean (shift + mean of the shifted data), not on the float32
    # sum / count alone, which leaves ~1e-5 here
    torch.testing.assert_close(mu, torch.zeros_like(mu), atol=4e-6, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_float32_on_offset_data_matches_float64(mode):
    # means of 2,000 standard deviations: sums of squares (sum x^2 - n mu^2, or of
    # x (x - mu)) lose every digit in float32 there; centred sums lose ~1e-4
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(32, 16, 6, 6, generator=g, dtype=torch.float64) + 2000.0
    dy = torch.randn(x64.shape, generator=g, dtype=torch.float64)
    bn32 = QBatchNorm2d(16, mode=mode, momentum=1.0)
    with torch.no_grad():
        for p in bn32.parameters():
            p.uniform_(0.5, 1.5, generator=g)
    bn64 = copy.deepcopy(bn32).double()
    x32 = x64.float().requires_grad_()
    x64.requires_grad_()
    y32, y64 = bn32(x32), bn64(x64)
    y32.backward(dy.float())
    y64.backward(dy)
    torch.testing.assert_close(y32.detach().double(), y64.detach(), atol=1e-3, rtol=0)
    torch.testing.assert_close(
        x32.grad.double(), x64.grad, atol=1e-4 * x64.grad.abs().max(), rtol=0
    )
    for p32, p64 in zip(bn32.parameters(), bn64.parameters(), strict=True):
        torch.testing.assert_close(
            p32.grad.double(), p64.grad, atol=1e-3 * p64.grad.abs().max(), rtol=0
        )
    for (name, b32), b64 in zip(bn32.named_buffers(), bn64.buffers(), strict=True):
        if b32.is_floating_point():
            torch.testing.assert_close(b32.double(), b64, rtol=1e-3, atol=1e-3, msg=name)


@pytest.mark.parametrize(
    ("cls", "shape"),
    [
        (QBatchNorm1d, (200,)),
        (QBatchNorm1d, (20, 7)),
        (QBatchNorm2d, (10, 3, 4)),
        (QBatchNorm3d, (6, 2, 3, 4)),
    ],
)
def test_whiten_1d_2d_3d(cls, shape):
    n, spatial = shape[0], shape[1:]
    x, _ = correlated(n, 2, spatial, cond=100.0, seed=7)
    bn = cls(8).double()
    y = bn(x)
    assert y.shape == x.shape
    _, cov = stats(y)
    torch.testing.assert_close(
        cov, 0.25 * torch.eye(4, dtype=torch.float64).expand(2, 4, 4), atol=1e-5, rtol=0
    )


def test_channels_last_and_noncontiguous_inputs_match():
    torch.manual_seed(0)
    x = torch.randn(6, 8, 5, 5)
    for mode in MODES:
        bn = QBatchNorm2d(8, mode=mode)
        randomize(bn)
        ref = bn(x)
        cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        out = bn(cl)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert out.is_contiguous(memory_format=torch.channels_last)
        out.square().sum().backward()
        assert torch.isfinite(cl.grad).all()
        strided = torch.randn(6, 8, 5, 10)[..., ::2]
        torch.testing.assert_close(bn(strided), bn(strided.contiguous()), atol=1e-5, rtol=1e-5)


# Bytes of one sample: 8 channels x 6 positions x float64 (x2 in the backward's stacked chunk).
# 2 samples: 2 per chunk in the forward (width 1), 1 in the backward (width 2), last partial.
# 7 samples: the forward's one chunk (reused by its second sweep), 3 in the backward.
@pytest.mark.parametrize("chunk_samples", [2, 7])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_whiten_chunked_sweeps_match_single_chunk(monkeypatch, training, fused, chunk_samples):
    import quatnn.nn.norm as norm_module

    # both ways of moving chunks: one fused strided op, or a transpose + in-place centering
    monkeypatch.setattr(norm_module, "_FUSED_MIN_SPATIAL", 1 if fused else 10**9)

    x, _ = correlated(7, 2, (3, 2), cond=100.0, seed=47)
    x = x + 10.0 * torch.arange(7, dtype=torch.float64).view(7, 1, 1, 1)  # drifting batch
    g = torch.randn_like(x)
    bn = QBatchNorm2d(8).double()
    randomize(bn)
    if not training:
        bn(x)
        bn.eval()

    def run():
        xg = x.clone().requires_grad_()
        bn.zero_grad()
        y = bn(xg)
        y.backward(g)
        return y.detach(), xg.grad, bn.weight.grad.clone(), bn.bias.grad.clone()

    whole = run()
    monkeypatch.setattr(norm_module, "_CPU_CHUNK_BYTES", chunk_samples * 8 * 8 * 6)
    chunked = run()
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    if training:
        _, cov = stats(chunked[0])
        gm = gamma_matrix(bn.weight.detach())
        torch.testing.assert_close(cov, gm @ gm.mT, atol=1e-4, rtol=0)  # eps = 1e-5


# ---------------------------------------------------------------------------------------
# variance mode
# ---------------------------------------------------------------------------------------


def test_variance_normalizes_power_and_keeps_correlation():
    x, _ = correlated(256, 3, (3, 3), cond=300.0, seed=11)
    bn = QBatchNorm2d(12, mode="variance").double()
    randomize(bn)
    y = bn(x)
    beta = bn.bias.detach().view(4, 3).t()
    gamma = bn.weight.detach()
    mu, cov = stats(y)
    torch.testing.assert_close(mu, beta, atol=1e-10, rtol=0)
    power = cov.diagonal(dim1=-2, dim2=-1).sum(-1)  # E|y - beta|^2
    torch.testing.assert_close(power, gamma.square(), rtol=1e-4, atol=0)
    _, cov_in = stats(x)
    # only rescaled: the covariance keeps its shape (correlations and anisotropy)
    scale = gamma.square() / (cov_in.diagonal(dim1=-2, dim2=-1).sum(-1) + bn.eps)
    torch.testing.assert_close(cov, cov_in * scale.view(3, 1, 1), rtol=1e-6, atol=1e-12)
    assert cov[0, 0, 1].abs() > 1e-3  # still correlated


def test_variance_portable_channel_sums_match_fused(monkeypatch):
    import quatnn.nn.norm as norm_module

    x, _ = correlated(12, 2, (3, 3), cond=30.0, seed=53)
    g = torch.randn_like(x)
    results = []
    for devices in (("cpu",), ()):  # fused reduction (CPU only) and the written-out one
        monkeypatch.setattr(norm_module, "_FUSED_SUM_DEVICES", devices)
        bn = QBatchNorm2d(8, mode="variance").double()
        randomize(bn)
        xg = x.clone().requires_grad_()
        y = bn(xg)
        y.backward(g)
        results.append((y.detach(), xg.grad, bn.weight.grad, bn.running_var))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_variance_equivariant_to_unit_quaternion(training):
    torch.manual_seed(2)
    x, _ = correlated(32, 2, (3, 3), cond=50.0, seed=13)
    bn = QBatchNorm2d(8, mode="variance").double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.7, 1.9], dtype=torch.float64))  # bias stays 0
    if not training:
        bn(x * 0.5 + 1.0)  # non-trivial running stats
        bn.running_mean.zero_()  # equivariance of the eval map needs an invariant center
        bn.eval()
    q = normalize(torch.randn(4, dtype=torch.float64))
    rotate = lambda t: to_blocked(hamilton_product(q, to_explicit(t, 1)), 1)  # noqa: E731
    torch.testing.assert_close(bn(rotate(x)), rotate(bn(x)), atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------
# split mode = nn.BatchNorm
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
def test_split_equals_torch_batchnorm(momentum):
    torch.manual_seed(3)
    ref = nn.BatchNorm2d(8, momentum=momentum)
    bn = QBatchNorm2d(8, mode="split", momentum=momentum)
    randomize(ref)
    bn.load_state_dict(ref.state_dict())
    for step in range(3):
        x = torch.randn(5, 8, 4, 3) * (step + 1) + step
        xr, xq = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yq = ref(xr), bn(xq)
        assert torch.equal(yr, yq)
        g = torch.randn_like(yr)
        yr.backward(g)
        yq.backward(g)
        assert torch.equal(xr.grad, xq.grad)
        assert torch.equal(ref.weight.grad, bn.weight.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ref, name), getattr(bn, name)), name
    ref.eval()
    bn.eval()
    x = torch.randn(2, 8, 4, 3)
    assert torch.equal(ref(x), bn(x))


# ---------------------------------------------------------------------------------------
# running statistics, eval, state
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["whiten", "variance"])
def test_running_stats_update_formula(mode):
    x1, _ = correlated(20, 2, (3,), cond=30.0, seed=17)
    x2, _ = correlated(20, 2, (3,), cond=30.0, seed=19)
    n = 60
    eye = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)

    def expected(x):
        mu, cov = stats(x)
        unbiased = cov * n / (n - 1)
        return mu.t().reshape(-1), unbiased if mode == "whiten" else unbiased.diagonal(
            dim1=-2, dim2=-1
        ).sum(-1)

    var_name = "running_cov" if mode == "whiten" else "running_var"
    init_var = eye if mode == "whiten" else torch.ones(2, dtype=torch.float64)
    # momentum 0.1: running = 0.9 running + 0.1 batch (unbiased)
    bn = QBatchNorm1d(8, mode=mode, momentum=0.1).double()
    bn(x1)
    m1, v1 = expected(x1)
    torch.testing.assert_close(bn.running_mean, 0.1 * m1, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(
        getattr(bn, var_name), 0.9 * init_var + 0.1 * v1, atol=1e-12, rtol=1e-12
    )
    assert int(bn.num_batches_tracked) == 1
    assert bn.running_mean.grad_fn is None and not getattr(bn, var_name).requires_grad
    # momentum None: cumulative average of the batches seen
    bn = QBatchNorm1d(8, mode=mode, momentum=None).double()
    bn(x1)
    bn(x2)
    m2, v2 = expected(x2)
    torch.testing.assert_close(bn.running_mean, (m1 + m2) / 2, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(getattr(bn, var_name), (v1 + v2) / 2, atol=1e-12, rtol=1e-12)
    assert int(bn.num_batches_tracked) == 2


@pytest.mark.parametrize("mode", MODES)
def test_eval_uses_running_stats_only(mode):
    x, _ = correlated(16, 2, (3, 3), cond=100.0, seed=23)
    bn = QBatchNorm2d(8, mode=mode).double()
    randomize(bn)
    for k in range(3):
        bn(x * (1 + k) + k)
    bn.eval()
    before = copy.deepcopy(bn.state_dict())
    y = bn(x)
    # one sample's output does not depend on the rest of the batch
    torch.testing.assert_close(bn(x[3:4]), y[3:4], atol=1e-12, rtol=1e-12)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    if mode == "whiten":
        ref = reference_whiten(
            x,
            gamma_matrix(bn.weight.detach()),
            bn.bias.detach().view(4, 2).t(),
            bn.running_mean.view(4, 2).t(),
            bn.running_cov,
            bn.eps,
        )
        torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    # and differs from the batch-statistics output
    bn.train()
    assert (bn(x) - y).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_no_running_stats_uses_batch_stats_in_eval(mode):
    x, _ = correlated(16, 2, (3,), cond=20.0, seed=29)
    bn = QBatchNorm1d(8, mode=mode, track_running_stats=False).double()
    assert bn.running_mean is None and bn.num_batches_tracked is None
    assert all(
        b is None for b in (getattr(bn, "running_cov", None), getattr(bn, "running_var", None))
    )
    y_train = bn(x)
    bn.eval()
    torch.testing.assert_close(bn(x), y_train, atol=0, rtol=0)
    assert dict(bn.named_buffers()) == {}


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trip_and_resets(mode):
    x, _ = correlated(12, 3, (2, 2), cond=20.0, seed=31)
    bn = QBatchNorm2d(12, mode=mode).double()
    randomize(bn)
    bn(x)
    bn(x + 1)
    sd = bn.state_dict()
    keys = {"weight", "bias", "running_mean", "num_batches_tracked"}
    keys.add("running_cov" if mode == "whiten" else "running_var")
    assert set(sd) == keys
    other = QBatchNorm2d(12, mode=mode).double()
    other.load_state_dict(sd)
    bn.eval()
    other.eval()
    assert torch.equal(bn(x), other(x))
    # resets
    bn.reset_running_stats()
    assert bn.running_mean.abs().max() == 0 and int(bn.num_batches_tracked) == 0
    if mode == "whiten":
        assert torch.equal(bn.running_cov, torch.eye(4, dtype=torch.float64).expand(3, 4, 4))
    else:
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    bn.reset_parameters()
    fresh = QBatchNorm2d(12, mode=mode).double()
    assert torch.equal(bn.weight, fresh.weight) and torch.equal(bn.bias, fresh.bias)
    if mode == "whiten":
        assert torch.equal(
            gamma_matrix(fresh.weight.detach()),
            0.5 * torch.eye(4, dtype=torch.float64).expand(3, 4, 4),
        )
    assert f"mode='{mode}'" in repr(bn) and "12" in repr(bn)


def test_affine_false_whitens_to_identity():
    x, _ = correlated(64, 2, (3,), cond=100.0, seed=37)
    bn = QBatchNorm1d(8, affine=False).double()
    assert bn.weight is None and bn.bias is None
    _, cov = stats(bn(x))
    torch.testing.assert_close(
        cov, torch.eye(4, dtype=torch.float64).expand(2, 4, 4), atol=1e-5, rtol=0
    )


# ---------------------------------------------------------------------------------------
# gradients and degenerate inputs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(mode, training):
    torch.manual_seed(5)
    bn = QBatchNorm2d(8, mode=mode).double()
    randomize(bn)
    x = (torch.randn(4, 8, 3, 2, dtype=torch.float64) * 2 + 1).requires_grad_()
    if not training:
        bn(x.detach() * 1.5)
        bn.eval()
    w = bn.weight.detach().clone().requires_grad_()
    b = bn.bias.detach().clone().requires_grad_()

    def f(x, w, b):
        return torch.func.functional_call(bn, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    # double backward (gradient penalties): the recorded gradient is the kernels' gradient
    # and differentiates correctly
    g = torch.randn_like(x)
    first = torch.autograd.grad(f(x, w, b), (x, w, b), g)
    recorded = torch.autograd.grad(f(x, w, b), (x, w, b), g, create_graph=True)
    for want, got in zip(first, recorded, strict=True):
        torch.testing.assert_close(got, want)
    small = x.detach()[:3, :, :, :1].clone().requires_grad_()  # keeps the check quick
    assert torch.autograd.gradgradcheck(f, (small, w, b))


def test_whiten_gradient_matches_autograd_reference():
    x, _ = correlated(10, 2, (3,), cond=50.0, seed=41)
    bn = QBatchNorm1d(8).double()
    randomize(bn)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    g = torch.randn_like(x)
    bn(x1).backward(g)
    ref = reference_whiten(x2, gamma_matrix(bn.weight.detach()), bn.bias.detach().view(4, 2).t())
    ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("mode", MODES)
def test_parameter_grads_without_input_grad(mode):
    x, _ = correlated(10, 2, (3,), cond=50.0, seed=43)
    bn = QBatchNorm1d(8, mode=mode).double()
    randomize(bn)
    bn(x).sin().sum().backward()
    gw, gb = bn.weight.grad.clone(), bn.bias.grad.clone()
    bn.zero_grad()
    xg = x.clone().requires_grad_()
    bn(xg).sin().sum().backward()
    torch.testing.assert_close(bn.weight.grad, gw)
    torch.testing.assert_close(bn.bias.grad, gb)
    assert gw.abs().max() > 0


@pytest.mark.parametrize("mode", MODES)
def test_constant_channel_and_pure_quaternions_stay_finite(mode):
    torch.manual_seed(7)
    x = torch.randn(8, 8, 3, 3)
    x[:, 0::2] = 0.25  # quaternion channel 0: every component constant
    pure = torch.randn(8, 8, 3, 3)
    pure[:, 0:2] = 0.0  # real parts 0: pure quaternions
    for inp in (x, pure):
        bn = QBatchNorm2d(8, mode=mode)
        xin = inp.clone().requires_grad_()
        y = bn(xin)
        assert torch.isfinite(y).all()
        (y * torch.randn_like(y)).sum().backward()
        assert torch.isfinite(xin.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in bn.parameters())
        assert all(torch.isfinite(b).all() for b in bn.buffers())
        bn.eval()
        assert torch.isfinite(bn(inp)).all()
    # the constant channel maps to beta (0 at init); the other channel is normalized
    y = QBatchNorm2d(8, mode=mode)(x)
    assert y[:, 0::2].abs().max() < 1e-6 and y[:, 1::2].abs().max() > 0.5


@pytest.mark.parametrize("mode", ["whiten", "variance"])
def test_autocast_and_low_precision(mode):
    torch.manual_seed(9)
    x = torch.randn(16, 8, 4, 4) * 3 + 2
    bn = QBatchNorm2d(8, mode=mode)
    ref = bn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)  # the 4x4 algebra stays fp32
    xb = x.bfloat16().requires_grad_()
    yb = bn(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ref, atol=0.1, rtol=0.05)
    yb.float().square().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()


@pytest.mark.parametrize("mode", MODES)
def test_low_precision_every_flag_combination(mode):
    torch.manual_seed(10)
    x = torch.randn(4, 8, 3, 3) * 2 + 1
    for affine, track, training in itertools.product([True, False], repeat=3):
        bn = QBatchNorm2d(8, mode=mode, affine=affine, track_running_stats=track)
        bn.train(training)
        ref = bn(x)
        if training and track:  # undo the update so that both calls see the same state
            bn = QBatchNorm2d(8, mode=mode, affine=affine, track_running_stats=track)
        xb = x.bfloat16().requires_grad_()
        y = bn(xb)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.05)
        y.float().sum().backward()
        assert xb.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_in_training_matches_torch_batchnorm(mode):
    ref = nn.BatchNorm2d(8)
    bn = QBatchNorm2d(8, mode=mode)
    before = copy.deepcopy(bn.state_dict())
    for module in (ref, bn):
        x = torch.randn(0, 8, 3, 3, requires_grad=True)
        y = module(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(module.weight.grad, torch.zeros_like(module.weight))
        assert torch.equal(module.bias.grad, torch.zeros_like(module.bias))
    # no statistics: the running ones stay; the call is counted, as nn.BatchNorm does
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 1
    for k, v in bn.state_dict().items():
        if k != "num_batches_tracked":
            assert torch.equal(v, before[k]), k
    assert bn(torch.randn(3, 8, 0, 2)).shape == (3, 8, 0, 2)
    no_stats = QBatchNorm2d(8, mode=mode, track_running_stats=False).eval()
    assert no_stats(torch.randn(0, 8, 2, 2)).shape == (0, 8, 2, 2)
    with pytest.raises(ValueError, match="more than 1 value"):  # as nn.BatchNorm
        bn(torch.randn(1, 8, 1, 1))


# ---------------------------------------------------------------------------------------
# torch.compile and torch.func
# ---------------------------------------------------------------------------------------


def _outputs_and_grads(fn, bn, x, g):
    xg = x.clone().requires_grad_()
    bn.zero_grad()
    y = fn(xg)
    y.backward(g)
    return y.detach(), xg.grad, bn.weight.grad.clone(), bn.bias.grad.clone()


@pytest.mark.parametrize("mode", ["whiten", "variance"])
def test_compiled_matches_eager(mode):
    torch.manual_seed(15)
    cases = [(QBatchNorm2d, (4, 8, 8, 8), (True, False)), (QBatchNorm1d, (4, 8, 16), (True,))]
    for cls, shape, modes in cases:
        eager = cls(8, mode=mode)
        randomize(eager)
        compiled_bn = copy.deepcopy(eager)
        compiled = torch.compile(compiled_bn)
        x = torch.randn(shape) * 2 + 1
        g = torch.randn_like(x)
        for training in modes:  # eval after training: non-trivial running statistics
            eager.train(training)
            compiled_bn.train(training)
            want = _outputs_and_grads(eager, eager, x, g)
            got = _outputs_and_grads(compiled, compiled_bn, x, g)
            for a, b in zip(want, got, strict=True):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
            for name, buf in eager.named_buffers():
                torch.testing.assert_close(compiled_bn.get_buffer(name), buf)
            if not training:  # no data-dependent branch: torch.export takes eval mode whole
                exported = torch.export.export(eager, (x,)).module()
                torch.testing.assert_close(exported(x), want[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["whiten", "variance"])
def test_compiled_training_norm_is_one_graph_and_skips_nonfinite_statistics(mode):
    """torch.compile traces the training-mode norm whole (Inductor fuses its passes); a
    non-finite batch gives a non-finite output there and leaves the running statistics as
    they were (eager mode raises instead)."""
    bn = QBatchNorm2d(8, mode=mode)
    x = torch.randn(4, 8, 6, 6)
    explained = torch._dynamo.explain(bn)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    compiled = torch.compile(bn)
    compiled(x)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x[1, 2, 3, 3] = float("nan")  # component 1 of quaternion channel 0
    y = compiled(x).unflatten(1, (4, 2))
    assert torch.isnan(y[:, :, 0]).all() and torch.isfinite(y[:, :, 1]).all()
    for name in ("running_mean", "running_cov" if mode == "whiten" else "running_var"):
        assert torch.equal(bn.get_buffer(name), before[name]), name


def test_eval_under_torch_func_transforms():
    x, _ = correlated(12, 2, (3, 2), cond=50.0, seed=59)
    bn = QBatchNorm2d(8).double()
    randomize(bn)
    bn(x)
    bn.eval()
    xs = torch.randn(3, 2, 8, 3, 2, dtype=torch.float64) * 2 + 1
    loop = torch.stack([bn(xi) for xi in xs])
    torch.testing.assert_close(torch.func.vmap(bn)(xs), loop, atol=1e-12, rtol=1e-12)
    for mode in ("variance", "split"):
        other = QBatchNorm2d(8, mode=mode).double().eval()
        ref = torch.stack([other(xi) for xi in xs])
        torch.testing.assert_close(torch.func.vmap(other)(xs), ref, atol=1e-12, rtol=1e-12)

    # grad (input and parameters) and per-sample gradients match autograd on the module
    params = {k: v.detach() for k, v in bn.named_parameters()}

    def loss(p, inp):
        return torch.func.functional_call(bn, p, (inp,)).sin().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, 0))
    grads_p, grads_x = per_sample(params, xs)
    for i, xi in enumerate(xs):
        xg = xi.clone().requires_grad_()
        bn.zero_grad()
        bn(xg).sin().sum().backward()
        torch.testing.assert_close(grads_x[i], xg.grad, atol=1e-12, rtol=1e-10)
        for k, v in bn.named_parameters():
            torch.testing.assert_close(grads_p[k][i], v.grad, atol=1e-12, rtol=1e-10)

    # an ensemble: batched parameters and running statistics (torch.func.stack_module_state)
    members = [copy.deepcopy(bn) for _ in range(3)]
    for k, member in enumerate(members):
        member.running_cov.mul_(k + 1)
        member.running_mean.add_(k)
    stacked = torch.func.stack_module_state(members)
    ensemble = torch.func.vmap(lambda p, b, inp: torch.func.functional_call(bn, (p, b), (inp,)))
    ys = ensemble(*stacked, xs)
    for k, member in enumerate(members):
        torch.testing.assert_close(ys[k], member(xs[k]), atol=1e-12, rtol=1e-12)

    # batch statistics are not supported: a clear error, and the state is left alone
    bn.train()
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises(RuntimeError, match="does not support torch.func transforms"):
        torch.func.vmap(bn)(xs)
    with pytest.raises(RuntimeError, match="does not support torch.func transforms"):
        torch.func.grad(lambda inp: bn(inp).sum())(xs[0])
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------


def test_errors():
    with pytest.raises(ValueError, match="num_features.*6"):
        QBatchNorm2d(6)
    with pytest.raises(ValueError, match=r"num_features.*8\.0 \(float, not an integer\)"):
        QBatchNorm2d(8.0)
    assert QBatchNorm2d(np.int64(8)).num_features == 8  # numpy's integers are integers
    for mode in MODES:  # rather than integer statistics (and a truncated output)
        with pytest.raises(TypeError, match="floating-point input.*torch.int64"):
            QBatchNorm2d(8, mode=mode)(torch.randint(-5, 5, (4, 8, 3, 3)))
    with pytest.raises(ValueError, match="mode"):
        QBatchNorm2d(8, mode="zca")
    bn = QBatchNorm2d(8)
    with pytest.raises(ValueError, match=r"12 channels.*num_features=8"):
        bn(torch.randn(2, 12, 3, 3))
    with pytest.raises(ValueError, match="3D"):
        bn(torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match="2D"):
        QBatchNorm3d(8)(torch.randn(2, 8))
    with pytest.raises(ValueError, match="4D"):
        QBatchNorm1d(8)(torch.randn(2, 8, 3, 3))
    for mode in MODES:
        with pytest.raises(ValueError, match="more than 1 value"):
            QBatchNorm1d(8, mode=mode)(torch.randn(1, 8))
        with pytest.raises(ValueError, match="more than 1 value"):
            QBatchNorm2d(8, mode=mode)(torch.randn(1, 8, 1, 1))
    QBatchNorm1d(8).eval()(torch.randn(1, 8))  # eval with running stats: fine
    for mode in ("whiten", "variance"):
        bn = QBatchNorm2d(8, mode=mode, momentum=None)  # cumulative average: counts matter
        before = copy.deepcopy(bn.state_dict())
        bad = torch.randn(4, 8, 2, 2)
        bad[1, 3, 0, 1] = float("nan")
        with pytest.raises(NonFiniteStatistics, match="non-finite"):
            bn(bad)
        bad[1, 3, 0, 1] = float("inf")
        with pytest.raises(NonFiniteStatistics, match="non-finite"):
            bn(bad)
        for k, v in bn.state_dict().items():  # the batches that raised are not counted
            assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="normalized_shape"):
        QLayerNorm(10)
    with pytest.raises(ValueError, match="last axis"):
        QLayerNorm(8)(torch.randn(3, 12))


# ---------------------------------------------------------------------------------------
# layer norm
# ---------------------------------------------------------------------------------------


def test_layer_norm_statistics():
    torch.manual_seed(11)
    c = 6
    x = torch.randn(3, 5, 4 * c, dtype=torch.float64) * torch.linspace(0.5, 4, 4 * c) + 3
    ln = QLayerNorm(4 * c).double()
    y = ln(x)
    q = y.unflatten(-1, (4, c))  # (..., 4, C)
    torch.testing.assert_close(
        q.mean(-1), torch.zeros(3, 5, 4, dtype=torch.float64), atol=1e-12, rtol=0
    )
    power = q.square().sum(-2).mean(-1)  # mean |q_c - mu|^2 per token: 4, a unit per real
    torch.testing.assert_close(
        power, torch.full((3, 5), 4.0, dtype=torch.float64), rtol=1e-4, atol=0
    )
    # the scale of nn.LayerNorm, whose outputs have unit mean square
    torch.testing.assert_close(
        y.square().mean(-1), nn.LayerNorm(4 * c).double()(x).square().mean(-1), rtol=1e-4, atol=0
    )  # (up to eps, whose share of the variance differs)
    # the components are not normalized separately: their variances keep their ratios
    xv = x.unflatten(-1, (4, c)).var(-1, correction=0)
    yv = q.var(-1, correction=0)
    torch.testing.assert_close(yv / yv.sum(-1, keepdim=True), xv / xv.sum(-1, keepdim=True))
    # affine: gamma per quaternion, beta a quaternion per channel
    with torch.no_grad():
        ln.weight.copy_(torch.linspace(0.5, 2, c))
        ln.bias.normal_()
    ya = ln(x).unflatten(-1, (4, c))
    torch.testing.assert_close(ya, q * ln.weight + ln.bias.view(4, c))
    # gradcheck through the autograd implementation
    xs = x[:1, :2].clone().requires_grad_()
    assert torch.autograd.gradcheck(ln, (xs,))
    assert QLayerNorm(8, elementwise_affine=False).weight is None


def test_layer_norm_adds_eps_once_to_the_variance_per_real():
    """y = (q - mu) / sqrt(mean_c |q_c - mu|^2 / 4 + eps), checked where eps matters."""
    torch.manual_seed(0)
    x = torch.randn(5, 16, dtype=torch.float64) * 3e-3  # variance ~1e-5, eps 1e-5
    ln = QLayerNorm(16, eps=1e-5, elementwise_affine=False).double()
    d = x.unflatten(-1, (4, 4))  # (..., 4, C)
    d = d - d.mean(-1, keepdim=True)
    power = d.square().sum(-2, keepdim=True).mean(-1, keepdim=True)
    torch.testing.assert_close(ln(x), (d / torch.sqrt(power / 4 + 1e-5)).flatten(-2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_16_bit_inputs(dtype):
    """Float32 statistics and parameters, the output in the input's dtype (nn.LayerNorm)."""
    torch.manual_seed(4)
    ln, x = QLayerNorm(16), torch.randn(3, 5, 16) * 4 + 2
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
        ln.bias.normal_()
    y = ln(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ln(x.to(dtype).float()), atol=1e-2, rtol=1e-2)


def test_layer_norm_equivariant_to_unit_quaternion():
    torch.manual_seed(12)
    x = torch.randn(7, 16, dtype=torch.float64)
    ln = QLayerNorm(16).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
    q = normalize(torch.randn(4, dtype=torch.float64))
    rotate = lambda t: to_blocked(hamilton_product(q, to_explicit(t, -1)), -1)  # noqa: E731
    torch.testing.assert_close(ln(rotate(x)), rotate(ln(x)))


def test_layer_norm_without_bias():
    """bias=False (nn.LayerNorm's argument, in its place): gamma only, no beta."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64) * 2 + 1
    ln = QLayerNorm(16, 1e-5, True, False, dtype=torch.float64)
    assert ln.bias is None and [n for n, _ in ln.named_parameters()] == ["weight"]
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
    plain = QLayerNorm(16, elementwise_affine=False).double()
    torch.testing.assert_close(ln(x), (plain(x).unflatten(-1, (4, 4)) * ln.weight).flatten(-2))
    ln.reset_parameters()
    assert torch.equal(ln.weight, torch.ones(4, dtype=torch.float64))
    assert "bias=False" in repr(ln)


def test_layer_norm_empty_input_is_silent():
    for shape in ((0, 8), (2, 0, 8)):
        x = torch.randn(shape, requires_grad=True)
        ln = QLayerNorm(8)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = ln(x)
            y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
        assert torch.equal(ln.weight.grad, torch.zeros(2))
        assert torch.equal(ln.bias.grad, torch.zeros(8))


# ---------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------


def test_convert_batchnorm():
    torch.manual_seed(13)
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3),
        nn.BatchNorm2d(8, momentum=0.3, eps=1e-3),
        nn.ReLU(),
        nn.Conv2d(8, 6, 1),
        nn.BatchNorm2d(6),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 12),
        nn.Sequential(nn.BatchNorm1d(12, affine=False)),
    )
    x = torch.randn(5, 4, 6, 6)
    net(x)
    net(x + 1)  # non-trivial running stats
    net.eval()
    ref = copy.deepcopy(net)
    split = convert_batchnorm(copy.deepcopy(net), mode="split")
    assert isinstance(split[1], QBatchNorm2d) and split[1].mode == "split"
    assert type(split[4]) is nn.BatchNorm2d  # 6 channels: not quaternion, untouched
    assert isinstance(split[7][0], QBatchNorm1d) and not split[7][0].affine
    assert split[1].eps == 1e-3 and split[1].momentum == 0.3 and not split[1].training
    assert torch.equal(split(x), ref(x))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(split[1], name), getattr(ref[1], name))
    out = convert_batchnorm(net)
    assert out is net and isinstance(net[1], QBatchNorm2d) and net[1].mode == "whiten"
    assert net[1].running_cov.shape == (2, 4, 4)
    single = convert_batchnorm(nn.BatchNorm3d(8), mode="variance")
    assert isinstance(single, QBatchNorm3d) and single.mode == "variance"


@pytest.mark.parametrize("mode", MODES)
def test_batchnorm_without_bias(mode):
    """``bias=False`` (as torch.nn's batch norms): a learnable Gamma, no learnable shift,
    and convert_batchnorm keeps it so."""
    torch.manual_seed(2)
    bn = QBatchNorm2d(8, mode=mode, bias=False)
    assert bn.bias is None and "bias=False" in repr(bn)
    assert [name for name, _ in bn.named_parameters()] == ["weight"]
    full = QBatchNorm2d(8, mode=mode)
    full.load_state_dict(bn.state_dict(), strict=False)  # the same Gamma, beta 0
    x = torch.randn(6, 8, 3, 3)
    torch.testing.assert_close(bn(x), full(x))
    bn.eval()
    full.eval()
    torch.testing.assert_close(bn(x), full(x))
    real = nn.BatchNorm2d(8, bias=False)
    real(x * 2 + 1)  # running statistics away from the start
    real.eval()
    converted = convert_batchnorm(copy.deepcopy(real), mode=mode)
    assert converted.bias is None and converted.weight is not None
    if mode == "split":
        assert torch.equal(converted(x), real(x))


def test_eval_whitening_is_cached_until_statistics_or_weight_move(monkeypatch):
    """Under no_grad, eval-mode whitening factorizes the running covariance once; an
    in-place update of it, a loaded state, an optimizer step (fused too), and a .data edit
    followed by eval() each give the output of a fresh copy with the same state."""
    torch.manual_seed(0)
    bn, x = QBatchNorm2d(8), torch.randn(6, 8, 3, 3)
    bn(torch.randn(6, 8, 3, 3) * 3 + 1)  # running statistics away from the identity
    bn.eval()
    factorizations, cholesky_ex = [], torch.linalg.cholesky_ex
    monkeypatch.setattr(
        torch.linalg, "cholesky_ex", lambda *a: factorizations.append(1) or cholesky_ex(*a)
    )

    def check() -> torch.Tensor:
        with torch.no_grad():
            y = bn(x)
            torch.testing.assert_close(y, copy.deepcopy(bn)(x))  # the copy factorizes anew
        return y

    with torch.no_grad():
        first = bn(x)
        torch.testing.assert_close(bn(x), first)
    assert factorizations == [1]  # the second call reused it
    with torch.no_grad():
        bn.running_cov.mul_(2)  # as a training step would update it
    assert not torch.allclose(check(), first)
    other = QBatchNorm2d(8)
    other(torch.randn(6, 8, 3, 3) - 2)
    bn.load_state_dict(other.state_dict())
    check()
    opt = torch.optim.SGD(bn.parameters(), lr=0.5)
    bn(x).square().sum().backward()  # eval mode with grad: computed afresh, not cached
    opt.step()
    check()
    fused = torch.optim.Adam(bn.parameters(), lr=0.5, fused=True)  # bumps no version
    bn(x).square().sum().backward()
    fused.step()
    check()
    bn.weight.data.mul_(0.5)  # bypasses the version counter ...
    bn.eval()  # ... so, as for fold_cache, a mode switch drops the cache
    check()


def test_norm_sync_cost_benchmark_runs_with_and_without_the_read_back():
    """benchmarks/norm_sync_cost.py (run on GPUs) trains with the check and with it patched
    out; here on CPU, at a tiny size: both rows and their ratio come out."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "norm_sync_cost.py"
    argv = ["--model", "resnet20", "--batch", "4", "--steps", "2"]
    done = subprocess.run(
        [sys.executable, str(script), *argv, "--rounds", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| checked (as shipped) |" in done.stdout and "| read-back skipped |" in done.stdout
    assert "skipping the read-back:" in done.stdout
    # both variants meet the same checks, one per norm call (the skip was on their path)
    checked, skipped = map(int, re.search(r"(\d+) checked, (\d+) skipped", done.stdout).groups())
    from quatnn import models

    norms = models.create("resnet20", "quaternion").modules()
    assert checked == skipped > 0 and checked % sum(isinstance(m, QBatchNorm2d) for m in norms) == 0
