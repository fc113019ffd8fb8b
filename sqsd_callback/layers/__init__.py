"""The kinds of trained layers the package scores, one module each, registered in ``registry.KINDS``: LoRA on
Linear layers (QLoRA's included), plain Linear layers and GPT-2's Conv1D trained in full."""

from . import conv1d, linear, lora  # noqa: F401  (each registers its kind)
from .conv1d import Conv1DTarget
from .linear import LinearTarget, Sampled
from .lora import LoraTarget, lora_linear_types, lora_targets, shared_start
from .registry import KINDS, LayerKind, find_targets, kind_of, register

Target = LoraTarget | LinearTarget
"""A trained layer as the package sees it (Conv1DTarget is a LinearTarget)."""

__all__ = ["KINDS", "Conv1DTarget", "LayerKind", "LinearTarget", "LoraTarget", "Sampled", "Target", "find_targets",
           "kind_of", "lora_linear_types", "lora_targets", "register", "shared_start"]
