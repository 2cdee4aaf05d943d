"""``quatnn bench train``: training throughput and peak memory of model variants.

Runs a few hundred Adam steps (cross-entropy on a fixed random batch, so data loading is
not measured) for each variant of one zoo model side by side in one process, interleaved
in chunks, and prints steps/s, samples/s, peak memory and the ratio to the first variant.

Example:
    quatnn bench train --model conv6 --variants real4,quaternion --steps 200
    quatnn bench train --model resnet18 --device cuda --amp bf16 --channels-last
    quatnn bench train --model resnet20 --option norm=variance
    quatnn bench train --model resnet20 --batch 128 --device cuda --compile \
        --compile-mode reduce-overhead
    quatnn bench train --model conv6 --algorithm rank8
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from quatnn import models
from quatnn.bench.timing import device_name, markdown_table, positive_int, sync, write_rows
from quatnn.functional import ALGORITHMS, use_algorithm
from quatnn.train.config import COMPILE_MODES, parse_option
from quatnn.train.errors import RunError

COLUMNS = ("variant", "params", "steps_per_s", "samples_per_s", "peak_mem_MB", "speed_x")


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run(
    model: str = "conv6",
    variants: tuple[str, ...] = (),
    batch: int = 60,
    steps: int = 200,
    chunk: int = 20,
    device: str = "cpu",
    amp: str | None = None,
    channels_last: bool = False,
    compile: str | None = None,
    options: dict | None = None,
    algorithm: str = "auto",
) -> list[dict]:
    """Steps/s and peak memory per variant (rows), ``speed_x`` relative to the first
    (default variants: the model's real variant, real4 or real, then quaternion). The peak
    memory (CUDA) is a variant's own: its parameters and input, and what its warm-up and
    one training step allocate on top of the other variants' state;
    ``compile`` is a :data:`COMPILE_MODES` mode to ``torch.compile`` the models with;
    ``options`` are the model's own (:func:`quatnn.models.create`); ``algorithm`` is
    forced on every quaternion layer (:func:`quatnn.functional.use_algorithm`)."""
    dev = torch.device(device)
    spec = models.spec(model)
    variants = tuple(variants) or (spec.real_variant, "quaternion")
    nets, opts, inputs = {}, {}, {}
    for variant in variants:
        torch.manual_seed(0)
        net = models.create(model, variant, **(options or {})).to(dev)
        channels = models.default_in_channels(model, variant)
        shape = (batch, channels, *spec.default_input_size)
        x = torch.randn(shape, device=dev)
        if channels_last and x.dim() == 4:
            net, x = (
                net.to(memory_format=torch.channels_last),
                x.contiguous(memory_format=torch.channels_last),
            )
        nets[variant] = net if compile is None else torch.compile(net, mode=compile)
        opts[variant] = torch.optim.Adam(net.parameters(), lr=1e-4)
        inputs[variant] = x
    labels = torch.randint(0, 10, (batch,), device=dev)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")

    def steps_of(variant: str, n: int) -> None:
        net, opt, x = nets[variant], opts[variant], inputs[variant]
        for _ in range(n):
            with (
                use_algorithm(algorithm),
                torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None),
            ):
                loss = F.cross_entropy(net(x), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    seconds = dict.fromkeys(variants, 0.0)
    peaks: dict[str, float | None] = dict.fromkeys(variants)
    for variant in variants:  # warm-up (and compilation), then the peak memory of one step
        sync(dev)
        others = _allocated(dev) - _bytes([*nets[variant].parameters(), inputs[variant]])
        steps_of(variant, 3)
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        steps_of(variant, 1)
        sync(dev)
        if dev.type == "cuda":
            peaks[variant] = (torch.cuda.max_memory_allocated(dev) - others) / 2**20
    rounds = [chunk] * (steps // chunk) + ([steps % chunk] if steps % chunk else [])
    for n in rounds:
        for variant in variants:
            start = time.perf_counter()
            steps_of(variant, n)
            sync(dev)
            seconds[variant] += time.perf_counter() - start
    rows = []
    for variant in variants:
        rate = steps / seconds[variant]
        rows.append(
            {
                "variant": variant,
                "params": models.count_parameters(nets[variant]),
                "steps_per_s": rate,
                "samples_per_s": rate * batch,
                "peak_mem_MB": peaks[variant] if peaks[variant] is not None else "",
                "speed_x": rate / (steps / seconds[variants[0]]),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="quatnn bench train",
        description="Training steps/s and peak memory of model variants side by side "
        "(Adam, cross-entropy, a fixed random batch; data loading not included).",
    )
    parser.add_argument("--model", default="conv6", help="zoo model (default: conv6)")
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated, speed relative to the first (default: real4,quaternion; "
        "real,quaternion for flat-input models such as lenet_300_100)",
    )
    parser.add_argument("--batch", type=positive_int, default=60, help="batch size (default: 60)")
    parser.add_argument(
        "--steps", type=positive_int, default=200, help="timed steps per variant (default: 200)"
    )
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="torch device (default: cpu)"
    )
    parser.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="autocast dtype")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile mode with --compile (default: default; reduce-overhead replays "
        "CUDA graphs)",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option, repeatable (as in quatnn train), e.g. norm=variance for ResNets",
    )
    parser.add_argument(
        "--algorithm",
        choices=ALGORITHMS,
        default="auto",
        help="force this algorithm on every quaternion layer (default: auto, per layer)",
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="also write the table (.csv or .json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        spec = models.spec(args.model)
        given = args.variants or f"{spec.real_variant},quaternion"
        variants = tuple(v.strip() for v in given.split(",") if v.strip())
        if not variants:
            raise ValueError("--variants needs at least one variant")
        options = dict(parse_option(text) for text in args.option)
        with torch.device("meta"):  # checks the names and options before anything runs
            for variant in variants:
                models.create(args.model, variant, **options)
    except (ValueError, TypeError, RunError) as err:
        parser.error(str(err))
    mode = args.compile_mode if args.compile else None
    compiled = "" if mode is None else f", compiled ({mode})"
    algorithm = "" if args.algorithm == "auto" else f", algorithm {args.algorithm}"
    print(
        f"{args.model} batch {args.batch} on {args.device}{compiled}{algorithm}, "
        f"torch {torch.__version__}"
    )
    rows = run(
        args.model,
        variants,
        args.batch,
        args.steps,
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=mode,
        options=options,
        algorithm=args.algorithm,
    )
    print(markdown_table(rows, COLUMNS))
    if args.out:
        write_rows(rows, args.out)
    return 0
