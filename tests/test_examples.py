"""The examples run as a user runs them, and do what they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(example: str) -> str:
    """The standard output of ``python examples/<example>``, which must succeed."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / example)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_quickstart_trains_a_mixed_network_that_learns():
    out = _run("quickstart.py")
    accuracy = float(out.split("held-out accuracy after 40 steps: ")[1])
    assert accuracy > 0.9  # two balanced classes: chance is 0.5
    assert "(0.25x)" in out  # a quarter of the real network's parameters


def test_lottery_ticket_example_prunes_rewinds_and_learns():
    out = _run("lottery_ticket.py")
    assert "pruned to 10.0% of its weights" in out
    ticket = float(out.split("ticket ")[1].split(",")[0])
    assert ticket > 0.85  # ten classes: chance is 0.1


def test_readme_python_snippets_run_on_their_own():
    """Each ```python block of the README runs as a file of its own, with the shapes its
    comments give."""
    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    blocks = [part.split("```")[0] for part in readme.split("```python\n")[1:]]
    results: dict = {}
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
        results.update(namespace)
    assert tuple(results["logits"].shape) == (8, 10)  # the layers' example
    assert tuple(results["tokens"].shape) == (8, 100, 256)  # the attention example
