"""CUDA path of the quaternion layers against the float64 CPU reference (the whitening's
fused Triton kernels included, also as the synchronized norm's sweeps), compiled batch
norms against the eager ones, and the quaternion Transformer encoder layer (CUDA attention
kernels, autocast) against float64 on the CPU (run on a GPU box).

    PYTHONPATH=src python benchmarks/cuda_check.py

Prints one line per check and exits non-zero on any mismatch.
"""

import copy
import sys

import torch

from quatnn import algebra
from quatnn import functional as QF
from quatnn.nn import (
    QBatchNorm1d,
    QBatchNorm2d,
    QConv2d,
    QLinear,
    QTransformerEncoderLayer,
    sync_norm,
)
from quatnn.nn.norm import _fused_norm

assert torch.cuda.is_available(), "needs a CUDA device"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = torch.device("cuda")
torch.manual_seed(0)
failures = 0


def check(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    global failures
    err = ((got.double().cpu() - want).norm() / want.norm()).item()
    ok = err <= rtol
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name}: relative error {err:.2e} (limit {rtol:.0e})")


w = torch.randn(4, 128, 256, dtype=torch.float64)
for rows in (64, 512):  # block applies its signs to the products below 256 rows, else folds
    x = torch.randn(rows, 1024, dtype=torch.float64)
    ref = algebra.reference_linear(x, w)
    for algo in ("block", "rank8"):
        check(
            f"linear {algo} float64, {rows} rows",
            QF.quaternion_linear(x.to(dev), w.to(dev), algorithm=algo),
            ref,
            1e-12,
        )
        check(
            f"linear {algo} float32, {rows} rows",
            QF.quaternion_linear(x.float().to(dev), w.float().to(dev), algorithm=algo),
            ref,
            1e-5,
        )
CONVS = [  # (options, image size); block sums the products at 2x2 (16 positions < 8 x 9)
    ({"padding": 1}, 12),
    ({"stride": 2, "padding": 1, "groups": 2}, 12),
    ({"padding": 1, "groups": 8}, 12),
    ({"padding": 1}, 2),
]
for kw, size in CONVS:
    xc = torch.randn(4, 32, size, size, dtype=torch.float64)
    wc = torch.randn(4, 8, 8 // kw.get("groups", 1), 3, 3, dtype=torch.float64)
    ref = algebra.reference_conv(xc, wc, **kw)
    for algo in ("block", "rank8"):
        check(
            f"conv2d {kw} {size}x{size} {algo} float64",
            QF.quaternion_conv(xc.to(dev), wc.to(dev), algorithm=algo, **kw),
            ref,
            1e-12,
        )
        check(
            f"conv2d {kw} {size}x{size} {algo} float32",
            QF.quaternion_conv(xc.float().to(dev), wc.float().to(dev), algorithm=algo, **kw),
            ref,
            1e-5,
        )
xt, wt = (
    torch.randn(2, 16, 5, 5, 5, dtype=torch.float64),
    torch.randn(4, 4, 2, 3, 3, 3, dtype=torch.float64),
)
ref = algebra.reference_conv(xt, wt, stride=2, transposed=True, output_padding=1)
for algo in ("block", "rank8"):
    got = QF.quaternion_conv(
        xt.to(dev), wt.to(dev), stride=2, transposed=True, output_padding=1, algorithm=algo
    )
    check(f"conv_transpose3d {algo} float64", got, ref, 1e-12)
# gradients on CUDA vs CPU float64
for algo in ("block", "rank8"):
    xs = torch.randn(8, 16, 6, 6, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(4, 4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    QF.quaternion_conv(xs, ws, padding=1, algorithm="block").square().sum().backward()
    xg, wg = xs.detach().to(dev).requires_grad_(), ws.detach().to(dev).requires_grad_()
    QF.quaternion_conv(xg, wg, padding=1, algorithm=algo).square().sum().backward()
    check(f"conv grad input {algo}", xg.grad, xs.grad, 1e-12)
    check(f"conv grad weight {algo}", wg.grad, ws.grad, 1e-12)
# a batch large enough for the rank-8 convolution to run in several chunks, float32
# against float64 block on the GPU, channels_last, forward and gradients
xb = torch.randn(64, 128, 32, 32, device=dev, dtype=torch.float64, requires_grad=True)
wb = (torch.randn(4, 32, 32, 3, 3, device=dev, dtype=torch.float64) / 16).requires_grad_()
yb = QF.quaternion_conv(xb, wb, padding=1, algorithm="block")
dy = torch.randn_like(yb)
want = [t.cpu() for t in (yb, *torch.autograd.grad(yb, (xb, wb), dy))]
xf = xb.detach().float().contiguous(memory_format=torch.channels_last).requires_grad_()
wf = wb.detach().float().requires_grad_()
yf = QF.quaternion_conv(xf, wf, padding=1, algorithm="rank8")
got = (yf, *torch.autograd.grad(yf, (xf, wf), dy.float()))
for name, g, w_ in zip(("output", "grad input", "grad weight"), got, want, strict=True):
    check(f"conv rank8 chunked channels_last {name}", g, w_, 1e-5)
# autocast on CUDA: auto picks block, result close to float32
model = torch.nn.Sequential(
    QConv2d(8, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), QLinear(32 * 64, 16)
).to(dev)
xa = torch.randn(16, 8, 8, 8, device=dev)
want = model(xa).double().cpu()
for dtype in (torch.bfloat16, torch.float16):
    with torch.autocast("cuda", dtype=dtype):
        got = model(xa)
    got.float().sum().backward()
    check(f"autocast {dtype} (dtype {got.dtype})", got.float(), want, 3e-2)
compiled = torch.compile(
    torch.nn.Sequential(QConv2d(8, 32, 3, padding=1, algorithm="rank8"), torch.nn.ReLU()).to(dev)
)
xs = torch.randn(4, 8, 8, 8, device=dev)
check("torch.compile rank8 conv", compiled(xs), compiled._orig_mod(xs).double().cpu(), 1e-5)
# whiten and variance modes in training: the fused Triton kernels against float64 on the CPU
for shape, layout, mode in (
    ((32, 64, 16, 16), torch.contiguous_format, "whiten"),
    ((16, 32, 8, 8), torch.channels_last, "whiten"),
    ((256, 128), torch.contiguous_format, "whiten"),
    ((32, 64, 16, 16), torch.contiguous_format, "variance"),
):
    torch.manual_seed(2)
    bn = (QBatchNorm2d if len(shape) == 4 else QBatchNorm1d)(shape[1], mode=mode).double()
    with torch.no_grad():
        bn.weight.add_(0.3 * torch.randn_like(bn.weight))
        bn.bias.normal_()
    x64 = torch.randn(shape, dtype=torch.float64) * 3 + 2
    dy64 = torch.randn(shape, dtype=torch.float64)
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        results = []
        for device, dt in (("cpu", torch.float64), (dev, dtype)):
            layer = copy.deepcopy(bn).to(device, torch.float32 if dt != torch.float64 else dt)
            xg = x64.to(device, dt).contiguous(memory_format=layout).requires_grad_()
            yg = layer(xg)
            grads = torch.autograd.grad(yg, (xg, layer.weight, layer.bias), dy64.to(device, dt))
            results.append((yg, *grads, *list(layer.buffers())[:2]))
        if _fused_norm(xg) is None:
            print(f"FAIL {mode} {shape} {dtype}: the Triton kernels did not run")
            failures += 1
        names = ("output", "grad input", "grad weight", "grad beta", "running mean", "running stat")
        for name, g, w_ in zip(names, results[1], results[0], strict=True):
            check(f"fused {mode} {tuple(shape)} {dtype} {name}", g, w_, rtol)
# the synchronized norm's kernel path, over a stand-in group of one process (its
# all-reduce the identity; the PyTorch-ops path's collective fails if reached), against
# the single-process layer in float64 on the CPU
sync_norm._all_reduce_ = lambda tensor, group: tensor
sync_norm._all_reduce_sum = lambda tensor, group: sys.exit("the PyTorch-ops path ran")
sync_norm.QSyncBatchNorm._group = lambda self: "stand-in group"
for mode in ("whiten", "variance"):
    torch.manual_seed(3)
    bn = QBatchNorm2d(32, mode=mode).double()
    with torch.no_grad():
        bn.weight.add_(0.3 * torch.randn_like(bn.weight))
        bn.bias.normal_()
    synced = sync_norm.convert_sync_batchnorm(copy.deepcopy(bn).to(dev, torch.float32))
    x64 = torch.randn(16, 32, 8, 8, dtype=torch.float64) * 3 + 2
    dy64 = torch.randn(16, 32, 8, 8, dtype=torch.float64)
    results = []
    for layer, dt in ((bn, torch.float64), (synced, torch.float32)):
        xg = x64.to(layer.bias.device, dt).requires_grad_()
        yg = layer(xg)
        grads = torch.autograd.grad(yg, (xg, layer.weight, layer.bias), dy64.to(xg))
        results.append((yg, *grads, *list(layer.buffers())[:2]))
    for name, g, w_ in zip(names, results[1], results[0], strict=True):
        check(f"synchronized {mode} (kernels) {name}", g, w_, 1e-5)
# batch norms in training, compiled (traced plain ops) against the eager CUDA kernels
for mode in ("whiten", "variance"):
    torch.manual_seed(1)
    xn, dyn = torch.randn(8, 16, 6, 6, device=dev) * 2 + 1, torch.randn(8, 16, 6, 6, device=dev)
    results = []
    for bn in (
        QBatchNorm2d(16, mode=mode).to(dev),
        torch.compile(QBatchNorm2d(16, mode=mode).to(dev)),
    ):
        xg = xn.clone().requires_grad_()
        yn = bn(xg)
        results.append((yn, *torch.autograd.grad(yn, xg, dyn)))
    for name, g, w_ in zip(("output", "grad input"), results[1], results[0], strict=True):
        check(f"torch.compile QBatchNorm2d({mode}) {name}", g, w_.double().cpu(), 1e-5)
# the quaternion encoder layer: CUDA attention kernels (no weights returned) and autocast
torch.manual_seed(2)
layer = QTransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, dtype=torch.float64)
xt, pad = torch.randn(8, 50, 64, dtype=torch.float64), torch.zeros(8, 50, dtype=torch.bool)
pad[::2, 40:] = True
dy = torch.randn(8, 50, 64, dtype=torch.float64)
xt64 = xt.clone().requires_grad_()
want = layer(xt64, src_key_padding_mask=pad)
(want_grad,) = torch.autograd.grad(want, xt64, dy)
cuda_layer = copy.deepcopy(layer).float().to(dev)
xg = xt.float().to(dev).requires_grad_()
got = cuda_layer(xg, src_key_padding_mask=pad.to(dev))
(got_grad,) = torch.autograd.grad(got, xg, dy.float().to(dev))
check("QTransformerEncoderLayer float32 output", got, want.detach(), 1e-5)
check("QTransformerEncoderLayer float32 grad input", got_grad, want_grad, 1e-5)
with torch.autocast("cuda", dtype=torch.bfloat16):
    got = cuda_layer(xt.float().to(dev), src_key_padding_mask=pad.to(dev))
check(f"QTransformerEncoderLayer autocast bf16 (dtype {got.dtype})", got, want.detach(), 3e-2)
print("failures:", failures)
sys.exit(1 if failures else 0)
