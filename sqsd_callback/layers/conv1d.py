"""GPT-2's ``Conv1D`` trained in full: a Linear whose weight is stored in×out (``y = x W + b``). Its per-example
math, gradient edit and drift are the Linear kind's, in out×in orientation; the target turns its weight, its
gradients and its snapshot once (``transposed``)."""

from __future__ import annotations

from torch import nn

from ..naming import canonical_name
from .linear import LinearHooks, LinearTarget, linear_drift
from .registry import LayerKind, register


class Conv1DTarget(LinearTarget):
    """A trainable ``transformers.pytorch_utils.Conv1D``: weight in×out."""

    transposed = True


def conv1d_targets(model: nn.Module) -> dict[str, Conv1DTarget]:
    """The model's trainable GPT-2-style Conv1D layers."""
    from transformers.pytorch_utils import Conv1D
    return {canonical_name(n): Conv1DTarget(canonical_name(n), m) for n, m in model.named_modules()
            if type(m) is Conv1D and m.weight.requires_grad}


def conv1d_weights(model: nn.Module) -> dict:
    """Every Conv1D's weight, turned to out×in, trained or not."""
    from transformers.pytorch_utils import Conv1D
    return {canonical_name(n): Conv1DTarget(n, m).weight_oi.detach() for n, m in model.named_modules()
            if isinstance(m, Conv1D)}


CONV1D = register(LayerKind("GPT-2 Conv1D", Conv1DTarget, conv1d_targets, LinearHooks, linear_drift,
                            weights=conv1d_weights))
