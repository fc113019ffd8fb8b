"""The weight matrices a run trains and the engines score: PEFT LoRA Linear layers, by canonical name."""

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

    def delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged delta as factors ``(scaling·B, A)``, detached."""
        return (self.scaling * self.B.detach(), self.A.detach())


def lora_targets(model: nn.Module) -> dict[str, LoraTarget]:
    """Every active vanilla-LoRA Linear in ``model``, keyed by the base model's module name."""
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as e:  # pragma: no cover - peft is a runtime dependency
        raise ImportError("sqsd_callback scores LoRA fine-tuning through peft: pip install peft") from e
    targets: dict[str, LoraTarget] = {}
    for name, module in model.named_modules():
        if not isinstance(module, lora_layer.Linear):
            continue
        active = [a for a in module.active_adapters if a in module.lora_A]
        if not active:
            continue
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
    if not targets:
        raise ValueError(
            "The model has no active LoRA Linear layer: wrap it with peft.get_peft_model(model, LoraConfig(...)) "
            "before training or scoring."
        )
    return targets
