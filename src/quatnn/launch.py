"""The ``quatnn`` console script: imports the command (torch takes seconds to load), then
runs it; a Ctrl-C while it loads exits with status 130 and one line, as one later does.

Example:
    >>> from quatnn.launch import main
    >>> main(["models", "--names", "lenet_300_100"])  # doctest: +ELLIPSIS
    | model | variant | params | ratio to real | MACs |
    ...
    0
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """:func:`quatnn.cli.main` of ``argv``, imported here so that Ctrl-C during the
    import is an interruption like any other (no traceback)."""
    try:
        from quatnn.cli import main as run
    except KeyboardInterrupt:
        print("quatnn: interrupted", file=sys.stderr)
        return 130
    return run(argv)
