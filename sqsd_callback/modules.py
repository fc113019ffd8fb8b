"""The weight matrices a run trains and the engines score, by canonical name: PEFT LoRA Linear layers, or (full
fine-tuning) plain Linear layers. Each target knows its parameters, its per-example update from their
gradients (the oracles' dense math) and a snapshot of itself (where drift starts)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .directions import canonical_name


@dataclass
class LoraTarget:
    """One LoRA-adapted Linear: its merged delta is ``scaling · lora_B.weight @ lora_A.weight`` (out×in)."""

    name: str
    lora_A: nn.Linear
    lora_B: nn.Linear
    scaling: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.lora_B.out_features, self.lora_A.in_features)

    @property
    def A(self) -> torch.Tensor:
        return self.lora_A.weight

    @property
    def B(self) -> torch.Tensor:
        return self.lora_B.weight

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.A, self.B)

    def update(self, gA: torch.Tensor, gB: torch.Tensor) -> torch.Tensor:
        """Per-example first-order change of the merged delta, −s(gB A + B gA), dense (n×out×in), fp64."""
        A, B = self.A.detach().double(), self.B.detach().double()
        return -self.scaling * (gB.double() @ A + B @ gA.double())

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The merged delta now, as factors ``(s·B, A)`` (fp32 copies); None while B = 0 (PEFT's initialisation:
        the delta is zero, and a copy would cost as much memory as the adapter)."""
        if not self.B.detach().any():
            return None
        return (self.scaling * self.B.detach().float(), self.A.detach().float().clone())


@dataclass
class LinearTarget:
    """A plain Linear trained in full: the example's update is −g, the negative weight gradient."""

    name: str
    module: nn.Linear

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.module.weight.shape)

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.module.weight,)

    def update(self, g: torch.Tensor) -> torch.Tensor:
        return -g.double()

    def snapshot(self) -> torch.Tensor:
        """A copy of W (in its own dtype and device: full-FT drift costs one copy of the covered weights)."""
        return self.module.weight.detach().clone()


Target = LoraTarget | LinearTarget


def find_targets(model: nn.Module) -> dict[str, Target]:
    """The model's LoRA Linear layers if it has active ones, else its trainable plain Linear layers."""
    lora = lora_targets(model, required=False)
    if lora:
        return lora
    linear = {canonical_name(n): LinearTarget(canonical_name(n), m) for n, m in model.named_modules()
              if type(m) is nn.Linear and m.weight.requires_grad}
    if not linear:
        raise ValueError("The model has no active LoRA Linear layer and no trainable Linear layer: wrap it with "
                         "peft.get_peft_model(model, LoraConfig(...)) or unfreeze the weights to fine-tune.")
    return linear


def lora_linear_types() -> tuple[type, ...]:
    """PEFT's LoRA layer classes whose update is ``scaling · lora_B @ lora_A`` over Linear factors: LoRA on a Linear,
    and QLoRA's bitsandbytes 4-bit and 8-bit base layers (present where bitsandbytes is installed)."""
    from peft.tuners.lora import bnb
    from peft.tuners.lora import layer as lora_layer
    return (lora_layer.Linear, *(getattr(bnb, n) for n in ("Linear4bit", "Linear8bitLt") if hasattr(bnb, n)))


def _adapters(module: nn.Module) -> list[str]:
    """The active adapters a PEFT LoRA layer actually holds (in any of its factor containers)."""
    held = [k for attr in ("lora_A", "lora_embedding_A") for k in getattr(module, attr, {})]
    return [a for a in module.active_adapters if a in held]


def lora_targets(model: nn.Module, required: bool = True) -> dict[str, LoraTarget]:
    """Every active vanilla-LoRA Linear in ``model`` (QLoRA's 4-/8-bit layers included), keyed by the base model's
    module name; a LoRA layer of any other kind (embedding, convolution, a type this package does not know) is an
    error naming its type, since its update cannot be scored as one."""
    from peft.tuners.lora.layer import LoraLayer
    known = lora_linear_types()
    targets: dict[str, LoraTarget] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        active = _adapters(module)
        if not active:
            continue
        if not isinstance(module, known):
            kind = f"{type(module).__module__}.{type(module).__qualname__}"
            raise ValueError(f"{name} is a LoRA layer of type {kind}, which SQSD cannot score: it scores LoRA on "
                             f"Linear layers ({', '.join(t.__qualname__ for t in known)}). Leave this module out "
                             f"of the LoraConfig's target_modules.")
        if len(active) > 1:
            raise ValueError(f"{name} has several active LoRA adapters {active}; score one adapter at a time "
                             f"(model.set_adapter(name)).")
        adapter = active[0]
        if adapter in getattr(module, "lora_variant", {}):
            variant = type(module.lora_variant[adapter]).__name__
            raise ValueError(f"{name}: adapter {adapter!r} is a LoRA variant ({variant}, e.g. DoRA) whose update "
                             f"is not scaling·B@A; use plain LoRA.")
        if getattr(module, "merged", False):
            raise ValueError(f"{name}: the LoRA adapter is merged into the base weight; unmerge it "
                             f"(model.unmerge_adapter()) so its factors can be scored.")
        targets[canonical_name(name)] = LoraTarget(
            canonical_name(name), module.lora_A[adapter], module.lora_B[adapter], float(module.scaling[adapter])
        )
    if not targets and required:
        raise ValueError(
            "The model has no active LoRA Linear layer: wrap it with peft.get_peft_model(model, LoraConfig(...)) "
            "before training or scoring."
        )
    return targets
