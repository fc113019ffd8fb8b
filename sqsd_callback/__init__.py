"""SQSD per-example safety-degradation scores and drift monitoring for Hugging Face fine-tuning.

The public names load on first use, so that ``import sqsd_callback`` (and the ``sqsd`` command's help) does not
import torch and transformers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_names

__version__ = "0.1.0"
__all__ = ["DirectionSet", "SQSDCallback", "SQSDConfig", "apply_safelora", "dataset_examples", "safety_records",
           "score_samples"]
_WHERE = {"DirectionSet": ".directions", "SQSDCallback": ".callback", "SQSDConfig": ".config",
          "dataset_examples": ".runtime.identity", "score_samples": ".offline", "apply_safelora": ".safelora",
          "safety_records": ".records"}

if TYPE_CHECKING:
    from .callback import SQSDCallback
    from .config import SQSDConfig
    from .directions import DirectionSet
    from .offline import score_samples
    from .records import safety_records
    from .runtime.identity import dataset_examples
    from .safelora import apply_safelora


__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
