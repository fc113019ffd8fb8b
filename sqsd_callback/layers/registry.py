"""The layer registry: every kind of trained layer the package scores, each registered once with everything the
package does per kind. Adding a kind is one module in this package (its target, hooks group and drift measure,
registered with ``register``) plus its test."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerKind:
    """One kind of trained layer.

    target: the class of its targets: parameters, shape (out×in), the oracles' per-example update from parameter
        gradients (``update``), the snapshot drift starts from, and the orientation of its weight.
    find: the model's layers of this kind that train, ``{canonical module name: target}``.
    hooks: the hooks engine's group class: the per-example math on the step's own backward pass, and the gradient
        edit for exact drops (``summed``: the summed gradients of some examples, in the parameters' layout).
    drift: ``drift(group, start) -> (dots L×sets, squared norms L)`` of θ_t − θ_0 for a group of these layers.
    adapter: an adapter kind (LoRA): where a model has layers of an adapter kind, only those are scored.
    weights: for a full fine-tuning kind, every layer of this kind in a model (trained or not) as its out×in weight,
        turned by the kind's own orientation (what ``DirectionSet.from_weight_diff`` subtracts).
    """

    name: str
    target: type
    find: Callable[[nn.Module], dict]
    hooks: type
    drift: Callable
    adapter: bool = False
    weights: Callable[[nn.Module], dict] | None = None


LAYER_KINDS: dict[type, LayerKind] = {}
"""Every registered kind, by its target class."""


def register(kind: LayerKind) -> LayerKind:
    """Add a layer kind to the registry (its target class must be new)."""
    if kind.target in LAYER_KINDS:
        raise ValueError(f"{kind.target.__qualname__} is already registered as layer kind "
                         f"{LAYER_KINDS[kind.target].name!r}.")
    LAYER_KINDS[kind.target] = kind
    return kind


def kind_of(target) -> LayerKind:
    """The registered kind of a target."""
    return LAYER_KINDS[type(target)]


def find_targets(model: nn.Module) -> dict:
    """The layers a run trains and the engines score: the model's active adapter layers (LoRA) where it has any,
    else its trainable layers of the full fine-tuning kinds (Linear, GPT-2's Conv1D). A layer whose weight another
    module also holds is left out, with a warning: a tied output layer's gradient also flows through the input
    embedding's lookup, which no layer kind scores per example."""
    for adapter in (True, False):
        found = {}
        for kind in LAYER_KINDS.values():
            if kind.adapter == adapter:
                found.update(kind.find(model))
        shared = _shared_parameters(model) if found else set()
        tied = sorted(m for m, t in found.items() if any(id(p) in shared for p in t.params))
        if tied:
            warnings.warn(f"{', '.join(tied)}: the weight is tied to another module's (tie_word_embeddings: the "
                          f"output layer shares the input embedding), so its gradient also comes from the "
                          f"embedding lookup, which SQSD does not score per example. It is left out of the scores "
                          f"and the drift, and exact drops need it frozen; untie the embeddings "
                          f"(tie_word_embeddings=False) to score it.", stacklevel=2)
        found = {m: t for m, t in found.items() if m not in tied}
        if found:
            return found
    raise ValueError("The model has no active LoRA layer and no trainable layer of a kind SQSD scores "
                     f"({', '.join(k.name for k in LAYER_KINDS.values())}, not tied to another module): wrap it with "
                     "peft.get_peft_model(model, LoraConfig(...)) or unfreeze the weights to fine-tune.")


def dense_weights(model: nn.Module) -> dict:
    """Every layer of the full fine-tuning kinds in ``model``, ``{canonical module name: out×in weight}``, each
    oriented by its kind."""
    out = {}
    for kind in LAYER_KINDS.values():
        if kind.weights is not None:
            out.update(kind.weights(model))
    return out


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds as its own (tied weights)."""
    held = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    return {i for i, n in held.items() if n > 1}
