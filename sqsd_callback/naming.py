"""Module names (a leaf module): direction sets, layers and scores key every module by the base model's own name,
whatever PEFT wrapping the training model has."""

from __future__ import annotations

PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """The base model's own module name: PEFT's ``base_model.model.`` prefix removed."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
