"""Warnings given once (a leaf module): a condition met at every step is reported at its first occurrence only."""

from __future__ import annotations

import warnings


class WarnOnce:
    """Gives each warning key once over the holder's life."""

    def __init__(self) -> None:
        self.given: set[str] = set()

    def __call__(self, key: str, message: str, stacklevel: int = 2) -> None:
        """Warn with ``message`` unless ``key`` was warned about before."""
        if key not in self.given:
            self.given.add(key)
            warnings.warn(message, stacklevel=stacklevel + 1)
