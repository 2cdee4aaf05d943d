"""The fused Triton kernels of the whitening and variance batch norms (quatnn.nn.norm_triton).

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
from quatnn.nn.norm import NonFiniteStatistics, QBatchNorm2d, triton_norms

norm_triton = pytest.importorskip("quatnn.nn.norm_triton")  # needs Triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no GPU and Triton's interpreter is off",
)


MODES = ("whiten", "variance")


@pytest.fixture
def fused():
    """Training-mode whitening and variance norms on DEVICE run the Triton kernels."""
    assert qnorm._triton_kernels() is not None
    with triton_norms(DEVICE):
        yield


def normalize(mode, x, weight, beta, eps=1e-5):
    """``(y, mu, statistic)`` of the mode's autograd function (eager dispatch)."""
    kernels = {"whiten": qnorm._WhitenBatch, "variance": qnorm._VarianceBatch}[mode]
    return kernels.apply(x, weight, beta, eps)


def inputs(mode, shape, seed=0, dtype=torch.float64):
    """Input, weight (symmetric Gamma (C, 4, 4) or gamma (C,)) and blocked beta on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1] // 4
    x = torch.randn(shape, generator=g, dtype=dtype) * 3 + 5
    if mode == "whiten":
        weight = torch.randn(c, 4, 4, generator=g, dtype=dtype)
        weight = (weight + weight.mT) / 2
    else:
        weight = torch.rand(c, generator=g, dtype=dtype) + 0.5
    beta = torch.randn(4 * c, generator=g, dtype=dtype)
    return x.to(DEVICE), weight.to(DEVICE), beta.to(DEVICE)


def outputs_and_grads(x, weight, beta, dy, fn):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, beta)]
    y, mu, stat = fn(*leaves)
    y.backward(dy)
    return [y.detach(), mu, stat] + [t.grad for t in leaves]


CASES = {  # (shape, channels_last)
    "2d, 3 slabs, a partial tile": ((6, 12, 7, 9), False),
    "2d channels_last": ((6, 12, 7, 9), True),
    "1d": ((37, 8), False),
    "3d": ((3, 8, 2, 3, 4), False),
    "40 channels (two blocks of 32)": ((3, 160, 2, 3), False),
    "40 channels channels_last": ((3, 160, 2, 3), True),
}


@pytest.mark.parametrize(("shape", "channels_last"), CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("mode", MODES)
def test_matches_chunked_and_autograd_reference(fused, mode, shape, channels_last):
    x, weight, beta = inputs(mode, shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    got = outputs_and_grads(x, weight, beta, dy, lambda *a: normalize(mode, *a))
    assert qnorm._fused_norm(x) is not None
    # the traced plain-ops form, differentiated by autograd (through torch.linalg)
    traced = {"whiten": qnorm._whiten_batch, "variance": qnorm._variance_batch}[mode]
    ref = outputs_and_grads(x, weight, beta, dy, lambda *a: traced.__wrapped__(*a, 1e-5))
    with triton_norms():
        chunked = outputs_and_grads(x, weight, beta, dy, lambda *a: normalize(mode, *a))
    names = ("y", "mu", "statistic", "dx", "dweight", "dbeta")
    for name, a, b, c in zip(names, got, ref, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9, msg=name)
    if channels_last:
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[3].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", MODES)
def test_many_slabs_match_the_pytorch_ops(fused, monkeypatch, mode):
    """10 slabs a channel (as on a GPU with many SMs): the one-program kernels add them up
    in three masked steps of 4."""
    monkeypatch.setattr(norm_triton, "_multiprocessors", lambda device: 50)
    x, weight, beta = inputs(mode, (5, 80, 16, 16))
    assert norm_triton._sweep(x, 20)[3] == 10 and norm_triton._one_program(20)["SLABS"] == 4
    dy = torch.randn_like(x)
    got = outputs_and_grads(x, weight, beta, dy, lambda *a: normalize(mode, *a))
    with triton_norms():
        chunked = outputs_and_grads(x, weight, beta, dy, lambda *a: normalize(mode, *a))
    for a, b in zip(got, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


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


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(fused, mode):
    x, weight, beta = inputs(mode, (3, 4, 2, 2), seed=2)
    args = tuple(t.requires_grad_() for t in (x, weight, beta))
    assert torch.autograd.gradcheck(lambda *a: normalize(mode, *a, 1e-3)[0], args)


@pytest.mark.parametrize("mode", MODES)
def test_module_training_matches_chunked(fused, mode):
    """Two float32 training steps: outputs, gradients and running statistics agree."""
    torch.manual_seed(0)
    fused_bn = QBatchNorm2d(16, mode=mode).to(DEVICE)
    randomize(fused_bn)
    chunked_bn = QBatchNorm2d(16, mode=mode).to(DEVICE)
    chunked_bn.load_state_dict(fused_bn.state_dict())
    xs = [torch.randn(8, 16, 6, 6, device=DEVICE) * 2 + 1 for _ in range(2)]
    results = []
    for bn, devices in ((fused_bn, (DEVICE,)), (chunked_bn, ())):
        with triton_norms(*devices):
            for x in xs:
                x = x.clone().requires_grad_()
                y = bn(x)
                (y * torch.arange(y.numel(), device=DEVICE).view_as(y).sin()).sum().backward()
                results += [y.detach(), x.grad]
        results += [bn.weight.grad, bn.bias.grad, *bn.buffers()]
    half = len(results) // 2
    for a, b in zip(results[:half], results[half:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_forward_matches_chunked_and_reference(fused, channels_last):
    x, _ = correlated(32, 3, (4, 5), seed=4)
    bn = QBatchNorm2d(12).double().to(DEVICE)
    randomize(bn)
    bn(x.to(DEVICE) * 1.5 - 1)  # running statistics away from their start
    bn.eval()
    x = x.to(DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = bn(x)
        with triton_norms():
            chunked = bn(x)
    torch.testing.assert_close(y, chunked, rtol=1e-12, atol=1e-12)
    gm = gamma_matrix(bn.weight.detach().cpu())
    running = (bn.running_mean.cpu().view(4, 3).t(), bn.running_cov.cpu())
    ref = reference_whiten(x.cpu(), gm, bn.bias.detach().cpu().view(4, 3).t(), *running)
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-10, atol=1e-10)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("mode", MODES)
def test_float32_statistics_do_not_cancel_on_a_large_mean(fused, mode):
    """Sums shifted by each channel's first value: a mean 1e5 times the spread loses no
    more than float32 rounding of the data (unshifted sums of squares would lose it all)."""
    x, weight, beta = inputs(mode, (8, 8, 6, 6), dtype=torch.float32)
    x = (x - x.mean()) * 1e-2 + 1e3
    y, mu, stat = normalize(mode, x, weight, beta)
    y64, mu64, stat64 = normalize(mode, x.double(), weight.double(), beta.double())
    torch.testing.assert_close(mu, mu64.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(stat, stat64.float(), rtol=1e-3, atol=0)
    torch.testing.assert_close(y, y64.float(), rtol=0, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision_input(fused, mode, dtype):
    x, weight, beta = inputs(mode, (4, 8, 5, 5), dtype=torch.float32)
    y, mu, stat = normalize(mode, x.to(dtype), weight, beta)
    assert y.dtype == dtype and mu.dtype == stat.dtype == torch.float32
    y32, mu32, _ = normalize(mode, x.to(dtype).float(), weight, beta)
    # the same float32 values, rounded once to the output dtype
    torch.testing.assert_close(y.float(), y32, rtol=torch.finfo(dtype).eps, atol=1e-3)
    torch.testing.assert_close(mu, mu32, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes with NaN
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_statistics_raise(fused, mode, bad):
    x, weight, beta = inputs(mode, (4, 8, 3, 3), dtype=torch.float32)
    x[2, 5, 1, 1] = bad  # 1e30 squared overflows float32
    with pytest.raises(NonFiniteStatistics):
        normalize(mode, x, weight, beta)


@pytest.mark.parametrize("mode", MODES)
def test_compiled_training_calls_the_kernels(fused, monkeypatch, mode):
    """torch.compile (one graph, dynamic batch size) calls the kernels as custom ops and
    matches the eager PyTorch ops: outputs, gradients, running statistics."""
    calls = []

    def counted(name):
        kernel = getattr(norm_triton, name)
        return lambda *args: (calls.append(name), kernel(*args))[1]

    for name in (f"{mode}_forward", f"{mode}_backward"):
        monkeypatch.setattr(norm_triton, name, counted(name))
    torch.manual_seed(0)
    compiled_bn = QBatchNorm2d(8, mode=mode).double().to(DEVICE)
    randomize(compiled_bn)
    eager_bn = QBatchNorm2d(8, mode=mode).double().to(DEVICE)
    eager_bn.load_state_dict(compiled_bn.state_dict())
    step = torch.compile(compiled_bn, fullgraph=True, dynamic=True)
    for n in (4, 6):
        x = (torch.randn(n, 8, 5, 3, dtype=torch.float64) * 2 + 1).to(DEVICE)
        dy = torch.randn_like(x)
        results = []
        for run, devices in ((step, (DEVICE,)), (eager_bn, ())):
            with triton_norms(*devices):
                xg = x.clone().requires_grad_()
                y = run(xg)
                y.backward(dy)
                results.append((y.detach(), xg.grad))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert calls == [f"{mode}_forward", f"{mode}_backward"] * 2
    for a, b in zip(compiled_bn.state_dict().values(), eager_bn.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(compiled_bn.weight.grad, eager_bn.weight.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("capability", "taken"), [((6, 1), False), ((7, 0), True), ((9, 0), True)])
def test_gpus_triton_does_not_compile_for_keep_the_pytorch_ops(monkeypatch, capability, taken):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    norm_triton._capable.cache_clear()
    try:
        assert norm_triton._capable(torch.device("cuda", 0)) == taken
    finally:
        norm_triton._capable.cache_clear()


def test_layouts_the_kernels_do_not_take_use_the_chunked_path(fused):
    x = torch.randn(4, 8, 6, 6, device=DEVICE)
    assert qnorm._fused_norm(x) is not None
    assert qnorm._fused_norm(x[:, :, ::2, :]) is None  # spatial axes not on one stride
    assert qnorm._fused_norm(x.transpose(2, 3)) is None
    assert qnorm._fused_norm(x[:0]) is None  # empty
    x3 = torch.randn(2, 8, 3, 1, 4, device=DEVICE)
    assert qnorm._fused_norm(x3.contiguous(memory_format=torch.channels_last_3d))
    assert qnorm._fused_norm(x3[:, :, :, :, 1:3]) is None
    strided = x.double()[:, :, ::2, :]
    gm, beta = inputs("whiten", (4, 8))[1:]
    y, _, _ = normalize("whiten", strided, gm, beta)  # the PyTorch ops, eagerly
    ref = qnorm._whiten_batch.__wrapped__(strided, gm, beta, 1e-5)[0]
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_kernels_copy_layouts_they_do_not_take(mode):
    """Called directly (as the compiled graphs call them), the kernels take any layout of
    the input and the output gradient: the same results as on contiguous copies."""
    x, weight, beta = inputs(mode, (4, 8, 6, 6))
    dy = torch.randn_like(x)
    forward, backward = (
        getattr(norm_triton, f"{mode}_forward"),
        getattr(norm_triton, f"{mode}_backward"),
    )

    def run(x, dy):
        y, mu, stat, *saved, _ = forward(x, weight, beta, 1e-5)
        if mode == "whiten":
            return y, *backward(x, dy, saved[0], weight)
        return y, *backward(x, dy, mu, saved[0], weight)

    strided = (x.transpose(2, 3), dy.transpose(2, 3))  # spatial axes not on one stride
    assert not norm_triton.supports(strided[0]) and not norm_triton.supports(strided[1])
    for a, b in zip(run(*strided), run(*(t.contiguous() for t in strided)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


COMPILE = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from quatnn.nn import norm_triton as K

    # Triton's launcher passes integers equal to 1 as constants: as for BatchNorm1d, and
    # the synchronized norm's one-program calls (one slab of sums over one value, the
    # mean read with stride 1)
    ONES = {"s_total", "a_s", "b_s", "x_s", "g_s", "o_s", "slabs", "x_c", "count"}
    # both modes, with few channels and with many
    ONE_PROGRAM = [dict(WHITEN=w, **K._one_program(c)) for w in (True, False) for c in (4, 512)]
    CONSTEXPRS = {
        K._gram_kernel: [dict(SAME=s, FIRST_CENTER=s, BLOCK=K._BLOCK) for s in (True, False)],
        K._mix_kernel: [dict(GRAD=g, BLOCK=K._BLOCK) for g in (False, True)],
        K._stats_kernel: ONE_PROGRAM,
        K._grad_kernel: ONE_PROGRAM,
    }
    DATA = {"a_ptr", "b_ptr", "x_ptr", "g_ptr", "out_ptr"}  # pointers to the data dtype
    for data, acc in (("bf16", "fp32"), ("fp32", "fp32"), ("fp64", "fp64")):
        for kernel, variants in CONSTEXPRS.items():
            ones = {name: 1 for name in ONES.intersection(kernel.arg_names)}
            for constexprs in [*variants, {**variants[-1], **ones}]:
                signature = {}
                for name in kernel.arg_names:
                    if name in constexprs:
                        if constexprs[name] == 1 and name in ONES:
                            signature[name] = "constexpr"
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


def test_bench_norm_times_the_pytorch_ops_beside_the_kernels(fused, monkeypatch):
    """Rows for the kernels and the PyTorch ops, eager and compiled; only the kernels' rows
    (2 of them, 2 runs each: warm-up and timed) call the kernels."""
    from quatnn.bench.norm import run

    calls = []
    kernel = norm_triton.whiten_forward
    monkeypatch.setattr(norm_triton, "whiten_forward", lambda *a: calls.append(1) or kernel(*a))
    rows = run(4, 8, 4, repeats=1, warmup=1, modes=("whiten",), device=DEVICE, compile=True)
    eager = ["nn.BatchNorm2d", "QBatchNorm2d(whiten)", "QBatchNorm2d(whiten, PyTorch ops)"]
    assert [r["layer"] for r in rows] == [*eager, *(f"{name}, compiled" for name in eager)]
    assert all(r["ms"] > 0 for r in rows)
    assert len(calls) == 4


# ---------------------------------------------------------------- nn/norm_ops


@pytest.mark.parametrize("mode", ["whiten", "variance"])
def test_compiled_kernel_norm_bias_gradient_is_the_sum_of_output_gradients(mode):
    """Compiled training through the kernels' custom ops (Triton's interpreter on the CPU):
    y = ... + beta, so d beta is dy summed over batch and space (blocked, as beta is)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("no GPU and Triton's interpreter is off")
    from quatnn.nn.norm import QBatchNorm2d, triton_norms

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    bn = QBatchNorm2d(8, mode=mode).double().to(device)
    step = torch.compile(bn, fullgraph=True, backend="aot_eager")  # no on-disk cache
    x = (torch.randn(4, 8, 3, 3, dtype=torch.float64) * 2 + 1).to(device)
    dy = torch.randn_like(x)
    with triton_norms(device):
        step(x).backward(dy)
    torch.testing.assert_close(bn.bias.grad, dy.sum((0, 2, 3)), rtol=1e-10, atol=1e-10)
