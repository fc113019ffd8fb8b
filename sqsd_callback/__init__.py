"""SQSD per-example safety-degradation scores and drift monitoring for Hugging Face fine-tuning."""

from .callback import SQSDCallback
from .config import SQSDConfig
from .directions import DirectionSet
from .scoring import score_samples

__all__ = ["DirectionSet", "SQSDCallback", "SQSDConfig", "score_samples"]
__version__ = "0.1.0"
