"""Direction sets: one matrix per weight matrix ("module"), dense or in low-rank factors, named by the base model's
own module names. A danger set points where harmful fine-tuning moves the weights, a safety set where safety
training moves them. Loaders: a PEFT adapter (local or on the Hub), a safetensors file, a weight difference."""

from ..types import Direction
from .sets import SET_KINDS, DirectionSet, check_sets

__all__ = ["SET_KINDS", "Direction", "DirectionSet", "check_sets"]
