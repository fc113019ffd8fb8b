"""Public names that load on first use, so that importing a package (and the ``sqsd`` command's help) does not import
torch and transformers."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, where: Mapping[str, str], namespace: dict[str, Any]) -> tuple[Callable, Callable]:
    """The ``__getattr__`` and ``__dir__`` of ``package``: name → its module (relative to ``package``) in ``where``,
    imported on first use and kept in ``namespace`` (the package's globals)."""

    def __getattr__(name: str):
        if name in where:
            value = getattr(importlib.import_module(where[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted([*namespace, *where])

    return __getattr__, __dir__
