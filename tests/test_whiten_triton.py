"""The fused Triton kernels of the whitening batch norm (quatnn.nn.whiten_triton).

Without a GPU they run in Triton's interpreter on CPU tensors (the root conftest sets
TRITON_INTERPRET), checked against the chunked PyTorch implementation, the plain-ops
autograd form and the obvious per-sample reference, in float64; and they are compiled for
a Hopper GPU (sm_90) in a subprocess, which needs no GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_norm import correlated, gamma_matrix, randomize, reference_whiten, stats

import quatnn.nn.norm as qnorm
from quatnn.nn.norm import NonFiniteStatistics, QBatchNorm2d, triton_whitening

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no GPU and Triton's interpreter is off",
)


@pytest.fixture
def fused():
    """Training-mode whitening on DEVICE runs the Triton kernels."""
    assert qnorm._triton_kernels() is not None
    with triton_whitening(DEVICE):
        yield


def whiten(x, gm, beta, eps=1e-5):
    return qnorm._WhitenBatch.apply(x, gm, beta, eps)


def inputs(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    c = shape[1] // 4
    x = torch.randn(shape, generator=g, dtype=dtype) * 3 + 5
    gm = torch.randn(c, 4, 4, generator=g, dtype=dtype)
    return x.to(DEVICE), ((gm + gm.mT) / 2).to(DEVICE), torch.randn(4 * c, dtype=dtype).to(DEVICE)


def outputs_and_grads(x, gm, beta, dy, fn):
    leaves = [t.detach().clone().requires_grad_() for t in (x, gm, beta)]
    y, mu, cov = fn(*leaves)
    y.backward(dy)
    return [y.detach(), mu, cov] + [t.grad for t in leaves]


SHAPES = {
    "2d, 3 slabs, a partial tile": (6, 12, 7, 9),
    "1d": (37, 8),
    "3d": (3, 8, 2, 3, 4),
    "40 channels (two blocks of 32)": (3, 160, 2, 3),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_chunked_and_autograd_reference(fused, shape, channels_last):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is 4-d")
    x, gm, beta = inputs(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    got = outputs_and_grads(x, gm, beta, dy, whiten)
    assert qnorm._fused_whitening(x) is not None
    # the traced plain-ops form, differentiated by autograd through torch.linalg
    traced = qnorm._whiten_batch.__wrapped__
    ref = outputs_and_grads(x, gm, beta, dy, lambda *a: traced(*a, 1e-5))
    with triton_whitening():
        chunked = outputs_and_grads(x, gm, beta, dy, whiten)
    names = ("y", "mu", "cov", "dx", "dgm", "dbeta")
    for name, a, b, c in zip(names, got, ref, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9, msg=name)
    if channels_last:
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[3].is_contiguous(memory_format=torch.channels_last)


def test_whitens_ill_conditioned_input_like_the_reference(fused):
    x, _ = correlated(64, 2, (3, 5), cond=1e3, seed=3)
    bn = QBatchNorm2d(8).double().to(DEVICE)
    randomize(bn)
    gm = gamma_matrix(bn.weight.detach().cpu())
    y = bn(x.to(DEVICE)).cpu()
    _, cov = stats(y)
    torch.testing.assert_close(cov, gm @ gm.mT, atol=1e-5, rtol=1e-5)
    ref = reference_whiten(x, gm, bn.bias.detach().cpu().view(4, 2).t())
    torch.testing.assert_close(y, ref, atol=1e-9, rtol=1e-9)


def test_gradcheck(fused):
    x, gm, beta = inputs((3, 4, 2, 2), seed=2)
    args = tuple(t.requires_grad_() for t in (x, gm, beta))
    assert torch.autograd.gradcheck(lambda *a: whiten(*a, 1e-3)[0], args)


def test_module_training_matches_chunked(fused):
    """Two float32 training steps: outputs, gradients and running statistics agree."""
    torch.manual_seed(0)
    fused_bn = QBatchNorm2d(16).to(DEVICE)
    randomize(fused_bn)
    chunked_bn = QBatchNorm2d(16).to(DEVICE)
    chunked_bn.load_state_dict(fused_bn.state_dict())
    xs = [torch.randn(8, 16, 6, 6, device=DEVICE) * 2 + 1 for _ in range(2)]
    results = []
    for bn, devices in ((fused_bn, (DEVICE,)), (chunked_bn, ())):
        with triton_whitening(*devices):
            for x in xs:
                x = x.clone().requires_grad_()
                y = bn(x)
                (y * torch.arange(y.numel(), device=DEVICE).view_as(y).sin()).sum().backward()
                results += [y.detach(), x.grad]
        results += [bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_cov]
    half = len(results) // 2
    for a, b in zip(results[:half], results[half:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input(fused, dtype):
    x, gm, beta = inputs((4, 8, 5, 5), dtype=torch.float32)
    y, mu, cov = whiten(x.to(dtype), gm, beta)
    assert y.dtype == dtype and mu.dtype == cov.dtype == torch.float32
    y32, mu32, _ = whiten(x.to(dtype).float(), gm, beta)
    # the same float32 values, rounded once to the output dtype
    torch.testing.assert_close(y.float(), y32, rtol=torch.finfo(dtype).eps, atol=1e-3)
    torch.testing.assert_close(mu, mu32, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes with NaN
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_non_finite_statistics_raise(fused, bad):
    x, gm, beta = inputs((4, 8, 3, 3), dtype=torch.float32)
    x[2, 5, 1, 1] = bad  # 1e30 squared overflows float32
    with pytest.raises(NonFiniteStatistics):
        whiten(x, gm, beta)


def test_layouts_the_kernels_do_not_take_use_the_chunked_path(fused):
    x = torch.randn(4, 8, 6, 6, device=DEVICE)
    assert qnorm._fused_whitening(x) is not None
    assert qnorm._fused_whitening(x[:, :, ::2, :]) is None  # spatial axes not on one stride
    assert qnorm._fused_whitening(x[:0]) is None  # empty
    y, _, _ = whiten(x[:, :, ::2, :], *inputs((4, 8))[1:])
    assert y.shape == (4, 8, 3, 6)


COMPILE = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from quatnn.nn import whiten_triton as K

    CONSTEXPRS = {
        K._gram_kernel: [dict(SAME=s, FIRST_CENTER=s, BLOCK=K._BLOCK) for s in (True, False)],
        K._mix_kernel: [dict(TWO=t, BLOCK=K._BLOCK) for t in (False, True)],
        K._whiten_stats_kernel: [dict(CHANNELS=K._CHANNELS)],
        K._whiten_grad_kernel: [dict(CHANNELS=K._CHANNELS)],
    }
    DATA = {"a_ptr", "b_ptr", "x_ptr", "out_ptr"}  # pointers to the input/output dtype
    for data, acc in (("bf16", "fp32"), ("fp32", "fp32"), ("fp64", "fp64")):
        for kernel, variants in CONSTEXPRS.items():
            for constexprs in variants:
                signature = {}
                for name in kernel.arg_names:
                    if name in constexprs:
                        continue
                    if name == "bad_ptr":
                        signature[name] = "*i32"
                    elif name.endswith("_ptr"):
                        signature[name] = "*" + (data if name in DATA else acc)
                    else:
                        signature[name] = "fp32" if name == "eps" else "i32"
                src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                triton.compile(src, target=GPUTarget("cuda", 90, 32))
    print("compiled")
    """
)


def test_kernels_compile_for_hopper():
    """Triton compiles every kernel variant to an sm_90 binary (no GPU needed), where the
    interpreter alone would accept code the compiler rejects."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def test_bench_norm_times_the_pytorch_ops_beside_the_kernels(fused):
    from quatnn.bench.norm import run

    rows = run(batch=4, channels=8, size=4, repeats=1, warmup=0, modes=("whiten",), device=DEVICE)
    assert [r["layer"] for r in rows] == [
        "nn.BatchNorm2d",
        "QBatchNorm2d(whiten)",
        "QBatchNorm2d(whiten, PyTorch ops)",
    ]
    assert all(r["ms"] > 0 for r in rows)
