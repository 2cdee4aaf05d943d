"""What the eager quaternion batch norms' host read-back costs a training step.

Each eager whiten/variance norm reads one flag back from the device per call, to raise
``NonFiniteStatistics`` on NaN/Inf batches (documented behaviour). On a GPU that read-back
waits for everything queued before it, so the host cannot run ahead of the device. This
script trains one zoo model (default: quaternion ResNet-20 at batch 128, whitening norms)
with the check as shipped and with the read-back skipped (a stand-in patched in for this
measurement only), alternating rounds, and prints steps/s of both and their ratio: the
figure to decide on before changing the documented check.

    PYTHONPATH=src python benchmarks/norm_sync_cost.py --device cuda
    PYTHONPATH=src python benchmarks/norm_sync_cost.py --option norm=variance
"""

import argparse
import statistics
from collections.abc import Callable
from unittest import mock

import torch

from quatnn.bench import train
from quatnn.nn import norm
from quatnn.train.config import parse_option

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="resnet20")
parser.add_argument("--variant", default="quaternion")
parser.add_argument("--batch", type=int, default=128)
parser.add_argument("--steps", type=int, default=40, help="timed steps per round")
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--device", default="cpu")
parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
args = parser.parse_args()
options = dict(parse_option(text) for text in args.option)

LABELS = {"checked": "checked (as shipped)", "unchecked": "read-back skipped"}
rates: dict[str, list[float]] = {name: [] for name in LABELS}
checks = dict.fromkeys(LABELS, 0)  # the norms' checks met, per variant
read_back = norm._flagged


def counted(name: str) -> Callable[[torch.Tensor], bool]:
    """``norm._flagged`` counting its calls: reading the flag back, or (unchecked) not."""

    def flagged(flag: torch.Tensor) -> bool:
        checks[name] += 1
        return name == "checked" and read_back(flag)

    return flagged


for _ in range(args.rounds):
    for name in LABELS:
        with mock.patch.object(norm, "_flagged", counted(name)):
            rows = train.run(
                args.model, (args.variant,), args.batch, args.steps, chunk=args.steps,
                device=args.device, options=options,
            )  # fmt: skip
        rates[name].append(rows[0]["steps_per_s"])
print(f"{args.model} {args.variant} batch {args.batch} on {args.device} {options or ''}")
print("| norms | steps/s (median) | rounds |\n|---|---|---|")
for name, label in LABELS.items():
    rounds = ", ".join(f"{rate:.1f}" for rate in rates[name])
    print(f"| {label} | {statistics.median(rates[name]):.2f} | {rounds} |")
print(f"norm checks met: {checks['checked']} checked, {checks['unchecked']} skipped")
ratio = statistics.median(rates["unchecked"]) / statistics.median(rates["checked"])
print(f"skipping the read-back: {ratio:.3f}x the steps/s")
