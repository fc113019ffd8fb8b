"""SQSD per-example safety-degradation scores and drift monitoring for Hugging Face fine-tuning.

The public names load on first use, so that ``import sqsd_callback`` (and the ``sqsd`` command's help) does not
import torch and transformers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["DirectionSet", "SQSDCallback", "SQSDConfig", "dataset_examples", "score_samples"]
_WHERE = {"DirectionSet": ".directions", "SQSDCallback": ".callback", "SQSDConfig": ".config",
          "dataset_examples": ".runtime.identity", "score_samples": ".offline"}

if TYPE_CHECKING:
    from .callback import SQSDCallback
    from .config import SQSDConfig
    from .directions import DirectionSet
    from .offline import score_samples
    from .runtime.identity import dataset_examples


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
