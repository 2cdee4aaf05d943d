"""``quatnn bench layers``: quaternion layers vs the real layer of the same real width.

For each size, times the real ``nn.Linear``/``nn.Conv2d`` and the quaternion layer with the
``block``, ``rank8`` and ``auto`` algorithms side by side in one process, forward only and
forward+backward, and prints ratios to the real layer (below 1 = faster than real).

Example:
    quatnn bench layers --quick
    quatnn bench layers --device cuda --out bench-layers.csv
    quatnn bench layers --linear 64x640,256x512 --conv 64x128x32
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

from quatnn import functional as QF
from quatnn.bench.timing import (
    device_name,
    interleaved_seconds,
    markdown_table,
    positive_int,
    write_rows,
)
from quatnn.nn import QConv2d, QLinear

ALGORITHMS = ("block", "rank8", "auto")
LINEAR = [(256, 256), (256, 1024), (256, 4096)]  # (batch, real width)
CONV = [(64, 64, 32), (64, 256, 32)]  # (batch, real channels, image size), 3x3, padding 1


def _sizes(
    form: str, counts: tuple[int, ...], quads: tuple[int, ...]
) -> Callable[[str], list[tuple[int, ...]]]:
    """argparse type: comma-separated sizes such as ``256x1024``, written as ``form`` says
    (in errors): as many positive integers as one of ``counts``, those at the positions
    ``quads`` (real sizes) multiples of 4."""

    def parse(text: str) -> list[tuple[int, ...]]:
        out = []
        for item in text.split(","):
            try:
                values = tuple(int(v) for v in item.strip().lower().split("x"))
            except ValueError:
                values = ()
            if (
                len(values) not in counts
                or min(values) < 1
                or any(values[q] % 4 for q in quads if q < len(values))
            ):
                raise argparse.ArgumentTypeError(
                    f"{item.strip()!r} is not {form} (positive integers, real sizes multiples of 4)"
                )
            out.append(values)
        return out

    return parse


def _cases(
    quick: bool,
    linear: list[tuple[int, ...]] | None = None,
    conv: list[tuple[int, ...]] | None = None,
) -> list[tuple[str, Callable[[], nn.Module], Callable[[], nn.Module], tuple]]:
    if linear is None and conv is None:
        linear = LINEAR[:2] if quick else LINEAR
        conv = [(16, 64, 16)] if quick else CONV
    linear, conv = linear or [], conv or []
    cases = []
    for b, n_in, *rest in linear:  # batch x width, or batch x in x out
        n_out = rest[0] if rest else n_in
        name = f"linear {n_in}" if n_out == n_in else f"linear {n_in}->{n_out}"
        cases.append(
            (
                f"{name} (batch {b})",
                lambda i=n_in, o=n_out: nn.Linear(i, o),
                lambda i=n_in, o=n_out: QLinear(i, o),
                (b, n_in),
            )
        )
    cases += [
        (
            f"conv3x3 {c}ch {s}x{s} (batch {b})",
            lambda c=c: nn.Conv2d(c, c, 3, padding=1),
            lambda c=c: QConv2d(c, c, 3, padding=1),
            (b, c, s, s),
        )
        for b, c, s in conv
    ]
    return cases


def _step(module: nn.Module, x: torch.Tensor, backward: bool) -> Callable[[], None]:
    def run() -> None:
        if backward:
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x).sum().backward()
        else:
            with torch.no_grad():
                module(x)

    return run


def _with_algorithm(algorithm: str, fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with QF.use_algorithm(algorithm):
            fn()

    return run


def run(
    device: str = "cpu",
    quick: bool = False,
    repeats: int = 5,
    linear: list[tuple[int, ...]] | None = None,
    conv: list[tuple[int, ...]] | None = None,
    input_grad: bool = False,
) -> list[dict]:
    """Time every case; one row per (case, pass) with seconds and ratios to real. Sizes
    given as ``linear`` ``(batch, width)`` or ``conv`` ``(batch, channels, image size)``
    replace the default ones. The backward computes the input's gradient too (as in a
    middle layer) with ``input_grad``, else only the parameters' (as in a first layer)."""
    rows = []
    for name, make_real, make_quat, shape in _cases(quick, linear, conv):
        real, quat = make_real().to(device), make_quat().to(device)
        x = torch.randn(*shape, device=device, requires_grad=input_grad)
        for backward in (False, True):
            fns = {"real": _step(real, x, backward)}
            for algorithm in ALGORITHMS:
                fns[algorithm] = _with_algorithm(algorithm, _step(quat, x, backward))
            seconds = interleaved_seconds(fns, device, repeats, min_seconds=1.0)
            passes = "fwd+bwd+dx" if input_grad else "fwd+bwd"
            row: dict = {"layer": name, "pass": passes if backward else "fwd"}
            row["real_ms"] = 1e3 * seconds["real"]
            row.update({f"{a}_x": seconds[a] / seconds["real"] for a in ALGORITHMS})
            rows.append(row)
            lines = markdown_table([row], list(row)).splitlines()  # the header with the first
            print("\n".join(lines if len(rows) == 1 else lines[-1:]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="quatnn bench layers",
        description="Time quaternion layers (block, rank8, auto) against the real layer of "
        "the same real width, side by side; prints time ratios to real (< 1 is faster).",
    )
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="torch device (default: cpu)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes only (seconds)")
    parser.add_argument(
        "--linear",
        type=_sizes("BATCHxWIDTH[xOUT]", (2, 3), (1, 2)),
        metavar="BxW[xO][,...]",
        help="linear sizes to time instead of the defaults, e.g. 64x512,60x784x300 (batch x "
        "real width, or batch x real in x real out): to re-measure the auto rule "
        "(quatnn.functional.RANK8_RULES) here",
    )
    parser.add_argument(
        "--conv",
        type=_sizes("BATCHxCHANNELSxSIZE", (3,), (1,)),
        metavar="BxCxS[,...]",
        help="3x3 convolution sizes to time instead of the defaults, e.g. 64x128x32 "
        "(batch x real channels x image size)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timed runs per measurement (default: 5)"
    )
    parser.add_argument(
        "--input-grad",
        action="store_true",
        help="the backward also computes the input's gradient, as in a middle layer (pass "
        "'fwd+bwd+dx'); by default only the parameters' (a first layer)",
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="also write the table (.csv or .json)")
    args = parser.parse_args(argv)
    if args.quick and (args.linear or args.conv):
        parser.error("--quick times its own small sizes: give it or --linear/--conv")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    rows = run(args.device, args.quick, args.repeats, args.linear, args.conv, args.input_grad)
    if args.out:
        write_rows(rows, args.out)
    return 0
