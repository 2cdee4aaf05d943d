"""Public names of a package imported from their submodules on first use (PEP 562), so
that importing a package, or building the ``quatnn`` command's ``--help``, does not load
torch (seconds)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence


def lazy_names(
    package: str, origins: Mapping[str, str], submodules: Sequence[str] = ()
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose public names ``origins`` maps to
    the submodules defining them (relative names), and whose ``submodules`` are imported
    when first named.

    >>> getattr_, dir_ = lazy_names("quatnn.train", {"RunError": "errors"}, ["config"])
    >>> getattr_("RunError").__name__, getattr_("config").__name__, "RunError" in dir_()
    ('RunError', 'quatnn.train.config', True)
    """

    def getattr_(name: str) -> object:
        if name in origins:
            return getattr(importlib.import_module(f"{package}.{origins[name]}"), name)
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def dir_() -> list[str]:
        return sorted({*vars(sys.modules[package]), *origins, *submodules})

    return getattr_, dir_
