"""Checkpoint files: atomic writes, a format tag and the run they belong to.

A checkpoint is a dict saved with ``torch.save`` holding ``format`` (:data:`FORMAT`),
``run`` (model, variant and dataset) and whatever state the caller adds. Loading checks
the tag and the run and reads with ``weights_only=True``, so a foreign file cannot run
code and is refused with one clear line.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "checkpoint.pt")
    >>> run = {"model": "conv2", "variant": "real4", "dataset": "cifar10"}
    >>> save(path, run, {"epoch": 3})
    >>> load(path, run)["epoch"]
    3
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from quatnn.train.errors import RunError

FORMAT = "quatnn-checkpoint-1"
_UNPICKLER = "WeightsUnpickler error:"  # where torch.load's refusal names its cause
RUN_KEYS = ("model", "variant", "dataset")


@contextlib.contextmanager
def signals_deferred(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back until the block has run, then deliver them to the
    handlers of before (in the main thread; elsewhere signals are not ours to catch).
    Blocks may nest: an inner one hands its signals to the outer one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _: pending.append(signum)) for s in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


def write_atomic(path: str | Path, write: Callable[[object], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it onto
    ``path``: readers see the old file or the new one, never half of one. A Ctrl-C or
    SIGTERM that arrives meanwhile is delivered once the file is in place (an interrupt
    inside ``torch.save`` would otherwise surface as a RuntimeError of its zip writer)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with signals_deferred():
        try:
            with open(tmp, mode.replace("w", "x")) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # (a missing folder: no temporary file)
                tmp.unlink(missing_ok=True)
            raise


def remove_leftovers(folder: str | Path) -> None:
    """Delete the temporary files of :func:`write_atomic` that a killed process left in
    ``folder`` (call only where no other process writes)."""
    for tmp in Path(folder).glob(".*.tmp"):
        if re.fullmatch(r"\..+\.\d+\.[0-9a-f]{8}\.tmp", tmp.name):
            tmp.unlink(missing_ok=True)


def save(path: str | Path, run: dict, state: dict) -> None:
    """Write ``state`` with the format tag and the model, variant and dataset of ``run``
    (a mapping with those keys, such as a config as a dict)."""
    payload = {"format": FORMAT, "run": {k: run[k] for k in RUN_KEYS}, **state}
    write_atomic(path, lambda f: torch.save(payload, f))


def load(path: str | Path, run: dict) -> dict:
    """Read a checkpoint of ``run``; RunError if it is missing, unreadable, not a quatnn
    checkpoint, or one of another model, variant or dataset."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"no checkpoint at {path}") from None
    except Exception as err:  # torch.load raises many types for damaged files
        reason = " ".join(str(err).split())
        if _UNPICKLER in reason:  # not torch's advice to load it unsafely: just the cause
            reason = reason.split(_UNPICKLER)[1].split(" Check the documentation")[0].strip()
        reason = reason.split(". ")[0][:200] or type(err).__name__  # its first sentence
        raise RunError(f"{path} is corrupt or not a checkpoint ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise RunError(f"{path} is not a quatnn checkpoint (no {FORMAT!r} format tag)")
    saved, wanted = payload.get("run", {}), {k: run[k] for k in RUN_KEYS}
    if saved != wanted:
        raise RunError(
            f"{path} belongs to another run ({'/'.join(map(str, saved.values()))}, "
            f"expected {'/'.join(wanted.values())})"
        )
    return payload
