"""The AsFT anchor: a penalty that keeps the LoRA update in the aligned directions' span, its gradient added to the
step's once the step's own gradients are complete."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..layers import LoraTarget
from ..runtime.distributed import add_to_grad
from .base import Policy, RunContext

if TYPE_CHECKING:
    from ..directions import DirectionSet


class Anchor(Policy):
    """AsFT's anchor (arXiv 2506.08473): λ Σ_m ‖(I − Ĉ_m) ΔW_m‖²_F with Ĉ = V Vᵀ/‖V‖_F and ΔW = s·B A the
    LoRA delta. Computed as s² tr(XᵀX · AAᵀ) with X = B − V(VᵀB)/‖V‖_F: r×r and out×r products only."""

    name = tensors_key = "anchor"
    edits_gradients = True

    def __init__(self, directions: DirectionSet, lam: float) -> None:
        directions.check_values()
        self.directions, self.lam = directions, lam
        self.value: float | None = None

    def describe(self) -> dict:
        return {"set": self.directions.name, "lambda": self.lam}

    def bind(self, run: RunContext) -> None:
        self.value = None  # a new run has added no penalty yet
        self.use(run.targets)

    def use(self, targets: dict) -> None:
        """Match the anchor's modules to the model's LoRA modules (same checks as scoring)."""
        if not all(isinstance(t, LoraTarget) for t in targets.values()):
            raise ValueError("The AsFT anchor constrains a LoRA update, but the model has no active LoRA layer: "
                             "wrap it with peft.get_peft_model(model, LoraConfig(...)) or drop anchor=.")
        self.modules = self.directions.match({m: t.shape for m, t in targets.items()})
        device = next(iter(targets.values())).A.device
        self.dirs = {m: self.directions.modules[m].to(device, torch.float32) for m in self.modules}
        self.norms = {m: math.sqrt(self.directions.modules[m].sq_norm()) for m in self.modules}
        self.targets = targets

    def penalty(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """The penalty as a function of the LoRA factors ``{module: (A, B)}``, by default the live ones
        (differentiable)."""
        factors = factors or {m: (self.targets[m].A, self.targets[m].B) for m in self.modules}
        total = 0.0
        for m in self.modules:
            t, V = self.targets[m], self.dirs[m]
            A, B = (f.float() for f in factors[m])
            VtB = V.times_left(B.T).T                       # (in×r) = Vᵀ B, through V's factors
            X = B - V.times_right(VtB) / self.norms[m]      # out×r
            total = total + t.scaling ** 2 * ((X.T @ X) * (A @ A.T)).sum()
        return self.lam * total

    def on_step_complete(self, step) -> None:
        self.value = self.add_grad()

    def scalars(self) -> dict[str, float]:
        return {} if self.value is None else {"sqsd/anchor_penalty": self.value}

    def add_grad(self) -> float:
        """Add the penalty's gradient to the LoRA factors' ``.grad`` (once per optimizer step); returns its value.
        Factors FSDP2 shards are gathered whole (every rank, the same order) and each rank adds its shard."""
        params = [p for m in self.modules for p in (self.targets[m].A, self.targets[m].B)]
        whole = [_whole(p).detach().requires_grad_() for p in params]
        with torch.enable_grad():
            value = self.penalty({m: (whole[2 * i], whole[2 * i + 1]) for i, m in enumerate(self.modules)})
            grads = torch.autograd.grad(value, whole)
        for p, g in zip(params, grads):
            add_to_grad(p, g)
        return float(value)


def _whole(p: torch.Tensor) -> torch.Tensor:
    """The parameter's whole value (an FSDP2 shard is all-gathered)."""
    from torch.distributed.tensor import DTensor
    return p.full_tensor() if isinstance(p, DTensor) else p
