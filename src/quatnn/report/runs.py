"""Reading run folders from disk: ``config.toml``, ``metrics.jsonl`` and ``summary.json``.

A run folder is any folder holding ``config.toml`` and ``metrics.jsonl`` (what
``quatnn train`` writes); a comparison is a folder of run folders.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> run = Path(tempfile.mkdtemp())
    >>> _ = (run / "config.toml").write_text('model = "conv2"\\nvariant = "real4"\\nseed = 1\\n')
    >>> _ = (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": 0.5}) + "\\n")
    >>> r = read_run(run)
    >>> r.variant, r.seed, r.finished, r.metrics[0]["test_acc"]
    ('real4', 1, False, 0.5)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ReportError(Exception):
    """A path given to the report holds no readable run; the message is one line."""


@dataclass
class Run:
    """One run folder as read from disk; ``summary`` is None while it is unfinished."""

    path: Path
    config: dict
    metrics: list[dict]
    summary: dict | None

    @property
    def model(self) -> str:
        return self.config.get("model", "?")

    @property
    def dataset(self) -> str:
        return self.config.get("dataset", "?")

    @property
    def variant(self) -> str:
        return self.config.get("variant", "?")

    @property
    def seed(self) -> int | None:
        return self.config.get("seed")

    @property
    def finished(self) -> bool:
        return self.summary is not None


def is_run(path: Path) -> bool:
    """Whether ``path`` is a run folder."""
    return (path / "config.toml").is_file() and (path / "metrics.jsonl").is_file()


def read_run(path: str | Path) -> Run:
    """Read the run folder ``path`` (ReportError if a file in it cannot be read)."""
    path = Path(path)
    try:
        config = tomllib.loads((path / "config.toml").read_text(encoding="utf-8"))
        lines = (path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        metrics = [json.loads(line) for line in lines if line.strip()]
        summary_path = path / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    except (OSError, ValueError) as err:  # TOML and JSON decode errors are ValueErrors
        raise ReportError(f"cannot read run folder {path}: {err}") from None
    return Run(path, config, metrics, summary)


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """The runs in ``paths``: each is a run folder or a folder whose subfolders (one
    level down) are run folders. ReportError if a path holds none."""
    runs = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ReportError(f"{path} is not a folder")
        folders = [path] if is_run(path) else sorted(p for p in path.iterdir() if is_run(p))
        if not folders:
            raise ReportError(
                f"{path} holds no quatnn runs (no config.toml and metrics.jsonl in it or "
                "its subfolders)"
            )
        runs += [read_run(folder) for folder in folders]
    return runs
