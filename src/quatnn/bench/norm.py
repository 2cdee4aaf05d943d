"""``quatnn bench norm``: quaternion batch norms vs ``nn.BatchNorm2d``, forward+backward.

Every layer runs in training mode on the same ``(batch, channels, size, size)`` tensor in
one process; the layers are timed round-robin (so a change in machine load hits all alike)
and each row reports the median time and its ratio to ``nn.BatchNorm2d`` with the same
number of real channels. Where the whiten and variance modes run fused Triton kernels
(CUDA), rows ``QBatchNorm2d(MODE, PyTorch ops)`` time the PyTorch-ops implementation
beside them.
``--compile`` adds a ``torch.compile`` twin of every layer
(compiled during the warm-up runs). Gradients are taken for the input and the parameters
with ``torch.autograd.grad``, so nothing accumulates between steps.

Example:
    quatnn bench norm
    quatnn bench norm --batch 32 --modes whiten --threads 1 --out bench-norm.csv
    quatnn bench norm --channels 16 --size 32 --compile

    >>> from quatnn.bench.norm import run
    >>> rows = run(batch=4, channels=8, size=4, repeats=2, warmup=1, modes=("variance",))
    >>> [r["layer"] for r in rows]
    ['nn.BatchNorm2d', 'QBatchNorm2d(variance)']
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
from torch import nn

from quatnn.bench.timing import (
    device_name,
    interleaved_seconds,
    markdown_table,
    positive_int,
    write_rows,
)
from quatnn.nn.norm import QBatchNorm2d, _fused_norm, triton_norms

__all__ = ["run", "main"]

MODES = ("whiten", "variance", "split")
COLUMNS = ("layer", "shape", "ms", "ratio")


def run(
    batch: int = 128,
    channels: int = 256,
    size: int = 16,
    repeats: int = 15,
    warmup: int = 3,
    modes: Sequence[str] = MODES,
    device: str = "cpu",
    seed: int = 0,
    compile: bool = False,
) -> list[dict]:
    """Time forward+backward of ``nn.BatchNorm2d(channels)`` and ``QBatchNorm2d(channels,
    mode)`` for each mode (and, with ``compile``, of each layer compiled); one row per
    layer with ``layer, mode, shape, ms`` (median) and ``ratio`` (to the eager
    ``nn.BatchNorm2d``), plus ``threads`` and ``device``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, channels, size, size)
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    grad = torch.randn(shape, generator=gen).to(device)

    def step(layer: nn.Module) -> Callable[[], None]:
        inputs = [x, *layer.parameters()]

        def run_once() -> None:
            torch.autograd.grad(layer(x), inputs, grad)

        return run_once

    def unfused(layer: nn.Module) -> Callable[[], None]:
        run_once = step(layer)

        def run_unfused() -> None:
            with triton_norms():
                run_once()

        return run_unfused

    # name -> (mode, layer, whether it runs the PyTorch ops where Triton kernels would)
    layers: dict[str, tuple[str, nn.Module, bool]] = {
        "nn.BatchNorm2d": ("-", nn.BatchNorm2d(channels).to(device), False)
    }
    for mode in modes:
        layer = QBatchNorm2d(channels, mode=mode).to(device)
        layers[f"QBatchNorm2d({mode})"] = (mode, layer, False)
        if mode in ("whiten", "variance") and _fused_norm(x) is not None:
            layers[f"QBatchNorm2d({mode}, PyTorch ops)"] = (mode, layer, True)
    if compile:
        for name, (mode, layer, ops) in list(layers.items()):
            layers[f"{name}, compiled"] = (mode, torch.compile(layer), ops)
    fns = {name: (unfused if ops else step)(layer) for name, (_, layer, ops) in layers.items()}
    seconds = interleaved_seconds(fns, device, repeats, warmup)
    base = seconds["nn.BatchNorm2d"]
    return [
        {
            "layer": name,
            "mode": mode,
            "shape": "x".join(map(str, shape)),
            "ms": 1e3 * seconds[name],
            "ratio": seconds[name] / base,
            "threads": torch.get_num_threads(),
            "device": device,
        }
        for name, (mode, _, _) in layers.items()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="quatnn bench norm",
        description="Time quaternion batch norms (whiten, variance, split) against "
        "nn.BatchNorm2d on the same tensor, forward+backward; prints time ratios.",
    )
    parser.add_argument("--batch", type=positive_int, default=128, help="(default: 128)")
    parser.add_argument(
        "--channels",
        type=positive_int,
        default=256,
        help="real channels, 4 per quaternion (default: 256)",
    )
    parser.add_argument(
        "--size", type=positive_int, default=16, help="height = width (default: 16)"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=15, help="timed runs per layer (default: 15)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (default: 3)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="torch device (default: cpu)"
    )
    parser.add_argument("--compile", action="store_true", help="also time each layer compiled")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="also write the table (.csv or .json)")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    rows = run(
        batch=args.batch,
        channels=args.channels,
        size=args.size,
        repeats=args.repeats,
        warmup=args.warmup,
        modes=args.modes,
        device=args.device,
        compile=args.compile,
    )
    print(markdown_table(rows, COLUMNS))
    if args.out:
        write_rows(rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
