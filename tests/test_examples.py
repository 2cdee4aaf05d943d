"""The examples run as a user runs them, and do what they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_trains_a_mixed_network_that_learns():
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    accuracy = float(done.stdout.split("held-out accuracy after 40 steps: ")[1])
    assert accuracy > 0.9  # two balanced classes: chance is 0.5
    assert "(0.25x)" in done.stdout  # a quarter of the real network's parameters
