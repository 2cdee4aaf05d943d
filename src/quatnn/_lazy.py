"""Public names of a package imported from their submodules on first use (PEP 562), so
that importing a package, or building the ``quatnn`` command's ``--help``, does not load
torch (seconds)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_names(
    package: str, origins: Mapping[str, str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose public names ``origins`` maps to
    the submodules defining them (relative names).

    >>> getattr_, dir_ = lazy_names("quatnn.train", {"RunError": "errors"})
    >>> getattr_("RunError").__name__, "RunError" in dir_()
    ('RunError', True)
    """

    def getattr_(name: str) -> object:
        if name in origins:
            return getattr(importlib.import_module(f"{package}.{origins[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def dir_() -> list[str]:
        return sorted({*vars(sys.modules[package]), *origins})

    return getattr_, dir_
