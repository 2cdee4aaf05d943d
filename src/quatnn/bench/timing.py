"""Timing helpers shared by the benchmarks: warm up, synchronize, take medians; and the
argument types of their command lines."""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from quatnn.train import device as devices
from quatnn.train.errors import RunError


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def device_name(text: str) -> str:
    """argparse type: a torch device that is available here (``auto`` picks one)."""
    try:
        return str(devices.resolve(text))
    except RunError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(
    fn: Callable[[], object], device: torch.device | str = "cpu", repeats: int = 7, warmup: int = 2
) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(
    fns: dict[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    repeats: int = 7,
    warmup: int = 2,
    min_seconds: float = 0.0,
) -> dict[str, float]:
    """Median wall time of each ``fn``, timing them round-robin so that a change in machine
    load during the measurement hits every contender alike; the order is shuffled every
    round (seeded), so none always runs after the same one (what a predecessor leaves in
    the caches and the allocator changes the next one's time). Every function runs the same
    number of times: ``repeats``, or more where the slowest would run under ``min_seconds``
    in total."""
    slowest = 0.0
    for fn in fns.values():
        for _ in range(warmup):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            slowest = max(slowest, time.perf_counter() - start)
    repeats = max(repeats, int(min_seconds / max(slowest, 1e-9)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    names, shuffle = list(fns), random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(names)
        for name in names:
            fn = fns[name]
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_rows(rows: Sequence[dict], path: str | Path) -> None:
    """Write rows as JSON (``.json``) or CSV (anything else)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(list(rows), indent=2) + "\n")
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
