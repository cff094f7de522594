"""Names a package imports on first use (PEP 562), so ``import questdiff`` and the command line stay fast."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Collection, Mapping
from typing import Any, Callable


def lazy_getattr(package: str, attributes: Mapping[str, str], submodules: Collection[str] = ()) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``name`` comes from its submodule ``attributes[name]`` (or is the
    submodule itself when listed in ``submodules``), imported on first use and then cached in the package, so later
    lookups skip the function."""

    def __getattr__(name: str) -> Any:
        if name in submodules:
            value = importlib.import_module(f".{name}", package)
        elif name in attributes:
            value = getattr(importlib.import_module(f".{attributes[name]}", package), name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
