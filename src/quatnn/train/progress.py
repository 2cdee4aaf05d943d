"""What a run shows while it trains: tqdm bars on stderr and one log line per epoch.

The log lines always go to stdout (printed above the bars, so they never mix) and to
the run's ``train.log``; the bars go only to stderr and only when enabled.

Example:
    >>> progress = Progress(enabled=False)
    >>> progress.write("epoch 1/1 done")
    epoch 1/1 done
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tqdm import tqdm

PROGRESS_MODES = ("auto", "on", "off")


def bars_wanted(mode: str) -> bool:
    """``on``, ``off``, or ``auto``: bars only when stderr is a terminal."""
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress must be one of {', '.join(PROGRESS_MODES)}; got {mode!r}")
    return sys.stderr.isatty() if mode == "auto" else mode == "on"


def _stdout_to_devnull() -> None:
    """Point stdout's file descriptor at /dev/null, so that later prints and the flush at
    exit do not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


class Progress:
    """Epoch and batch bars (when ``enabled``) and log lines (stdout and ``log_file``);
    ``quiet`` silences everything, for processes other than the main one."""

    def __init__(
        self, enabled: bool = False, log_file: str | Path | None = None, quiet: bool = False
    ) -> None:
        self.enabled, self.log_file, self.quiet = enabled and not quiet, log_file, quiet
        self._epochs: tqdm | None = None
        self._batches: tqdm | None = None

    def start_epochs(self, total: int, done: int) -> None:
        if self.enabled:
            self._epochs = tqdm(
                total=total,
                initial=done,
                desc="epochs",
                unit="ep",
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def start_batches(self, total: int, epoch: int) -> None:
        if self.enabled:
            self._batches = tqdm(
                total=total,
                desc=f"epoch {epoch}",
                unit="batch",
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def update_batches(self, n: int, **postfix: str) -> None:
        if self._batches is not None:
            self._batches.set_postfix(postfix, refresh=False)
            self._batches.update(n)

    def end_epoch(self, **postfix: str) -> None:
        if self._batches is not None:
            self._batches.close()
            self._batches = None
        if self._epochs is not None:
            self._epochs.set_postfix(postfix, refresh=False)
            self._epochs.update(1)

    def write(self, line: str) -> None:
        """Append ``line`` to the log file and print it to stdout above any bars. When
        stdout's reader is gone (``quatnn train | head``), printing stops and the run goes
        on: the log file still gets every line."""
        if self.quiet:
            return
        self.log(line)
        try:
            if self.enabled:
                tqdm.write(line, file=sys.stdout)
            else:
                print(line, flush=True)
        except BrokenPipeError:
            _stdout_to_devnull()

    def log(self, line: str) -> None:
        """Append ``line`` to the log file only (what the caller reports elsewhere)."""
        if self.log_file is not None and not self.quiet:
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def close(self) -> None:
        for bar in (self._batches, self._epochs):
            if bar is not None:
                bar.close()
        self._batches = self._epochs = None
