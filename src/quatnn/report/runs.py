"""Reading run folders from disk: ``config.toml``, ``metrics.jsonl`` and ``summary.json``.

A run folder is any folder holding ``config.toml`` and ``metrics.jsonl`` (what
``quatnn train`` writes); run folders are found at any depth below the folders given
(a compare folder, a lottery folder, folders of those). A lottery level folder also
holds ``sparsity.json``, which names its level and control.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> run = Path(tempfile.mkdtemp())
    >>> _ = (run / "config.toml").write_text('model = "conv2"\\nvariant = "real4"\\nseed = 1\\n')
    >>> row = {**dict.fromkeys(METRIC_KEYS, 0.5), "epoch": 1}
    >>> _ = (run / "metrics.jsonl").write_text(json.dumps(row) + "\\n")
    >>> r = read_run(run)
    >>> r.variant, r.seed, r.finished, r.metrics[0]["test_acc"], r.lottery
    ('real4', 1, False, 0.5, None)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ReportError(Exception):
    """A path given to the report holds no readable run; the message is one line."""


METRIC_KEYS = ("epoch", "train_acc", "test_acc", "train_loss", "test_loss", "epoch_seconds",
               "samples_per_second")  # fmt: skip
"""The keys of a ``metrics.jsonl`` row that reports read."""


@dataclass
class Run:
    """One run folder as read from disk; ``summary`` is None while it is unfinished.
    ``lottery`` is None unless the run is a lottery level: then its ``level``, its
    ``control`` (``ticket`` for none) and the ``[lottery]`` table of its lottery's
    ``lottery.toml`` (where that is two folders up, as :mod:`quatnn.prune.lottery`
    writes it); ``params_left`` its parameters left after pruning (None for other runs)."""

    path: Path
    config: dict
    metrics: list[dict]
    summary: dict | None
    lottery: dict | None = None
    params_left: int | None = None

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


def _lottery(path: Path) -> tuple[dict | None, int | None]:
    """:attr:`Run.lottery` and :attr:`Run.params_left` of the run folder ``path``:
    lottery levels hold ``sparsity.json``."""
    if not (path / "sparsity.json").is_file():
        return None, None
    counts = json.loads((path / "sparsity.json").read_text(encoding="utf-8"))
    recipe_path = path.parent.parent / "lottery.toml"
    recipe = {}
    if recipe_path.is_file():
        recipe = tomllib.loads(recipe_path.read_text(encoding="utf-8")).get("lottery", {})
    level = {"level": counts.get("level"), "control": counts.get("control") or "ticket"}
    return {**level, **recipe}, counts.get("params", {}).get("remaining")


def read_run(path: str | Path) -> Run:
    """Read the run folder ``path`` (ReportError if a file in it cannot be read)."""
    path = Path(path)
    try:
        config = tomllib.loads((path / "config.toml").read_text(encoding="utf-8"))
        metrics = _metrics(path / "metrics.jsonl")
        summary_path = path / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        lottery, params_left = _lottery(path)
    except (OSError, ValueError) as err:  # TOML and JSON decode errors are ValueErrors
        raise ReportError(f"cannot read run folder {path}: {err}") from None
    return Run(path, config, metrics, summary, lottery, params_left)


def _metrics(path: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` at ``path``, without a last row still being written
    (no newline yet); ValueError for any other row that is no quatnn metrics row."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path.name}, line {number}: {err}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path.name}, line {number}: not a metrics row (a JSON object)")
        missing = [k for k in METRIC_KEYS if k not in row]
        if missing:
            raise ValueError(f"{path.name}, line {number}, lacks {', '.join(missing)}")
        rows.append(row)
    return rows


def _run_folders(path: Path, visited: set[Path]) -> Iterator[Path]:
    """The run folders at or below ``path``, depth first in name order; a run folder is
    not searched further and no folder is entered twice (``visited``: resolved paths)."""
    resolved = path.resolve()
    if resolved in visited:
        return
    visited.add(resolved)
    if is_run(path):
        yield path
        return
    try:
        children = sorted(child for child in path.iterdir() if child.is_dir())
    except OSError as err:
        raise ReportError(f"cannot read folder {path}: {err}") from None
    for child in children:
        yield from _run_folders(child, visited)


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """The runs in ``paths``, each a run folder or a folder with run folders at any
    depth below it; a run folder reached twice (same resolved path) is read once.
    ReportError if a path holds none."""
    runs, seen = [], set()
    for path in map(Path, paths):
        if not path.is_dir():
            raise ReportError(f"{path} is not a folder")
        folders = list(_run_folders(path, set()))
        if not folders:
            raise ReportError(
                f"{path} holds no quatnn runs (no folder with config.toml and metrics.jsonl "
                "at any depth)"
            )
        for folder in folders:
            key = folder.resolve()
            if key not in seen:
                seen.add(key)
                runs.append(read_run(folder))
    return runs
