"""The kinds of trained layers the package scores, one module each, registered in ``registry.LAYER_KINDS``: LoRA on
Linear layers (QLoRA's included), plain Linear layers and GPT-2's Conv1D trained in full. A new kind is one module
here (its target, hooks group and drift measure, registered with ``register``), its test, and its import below."""

from . import conv1d, linear, lora  # noqa: F401  (each registers its kind)
from .conv1d import Conv1DTarget
from .linear import LinearTarget, Sampled
from .lora import LoraTarget, a_cosine, lora_linear_types, lora_targets, shared_start
from .registry import LAYER_KINDS, LayerKind, dense_weights, find_targets, kind_of, register

__all__ = ["LAYER_KINDS", "Conv1DTarget", "LayerKind", "LinearTarget", "LoraTarget", "Sampled", "a_cosine",
           "dense_weights", "find_targets", "kind_of", "lora_linear_types", "lora_targets", "register", "shared_start"]
