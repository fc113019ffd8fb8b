"""The paper's reference: one forward/backward per example at batch size 1, padding removed, the model's own
loss, dense per-example gradients. Slow by design; the oracle the fast engines are tested against."""

from __future__ import annotations

import torch
from torch import nn

from ..directions import DirectionBank
from ..modules import LoraTarget
from .base import Batch, Stats, dense_stats, scoring_mode


class LoopEngine:
    name = "loop"

    def __init__(self, targets: dict[str, LoraTarget], bank: DirectionBank) -> None:
        self.targets, self.bank = targets, bank

    def compute(self, model: nn.Module, batch: Batch) -> Stats:
        per_module = {m: ([], []) for m in self.bank.modules}
        with scoring_mode(model, self.targets):
            for ids, mask, labels in zip(batch.input_ids, batch.attention_mask, batch.labels):
                keep = mask.bool()
                ids, labels = ids[keep][None], labels[keep][None]
                factors = [p for m in self.bank.modules for p in (self.targets[m].A, self.targets[m].B)]
                if (labels[:, 1:] != -100).any():
                    loss = model(input_ids=ids, labels=labels).loss
                    grads = torch.autograd.grad(loss, factors, allow_unused=True)
                    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, factors)]
                else:
                    grads = [torch.zeros_like(p) for p in factors]
                for j, m in enumerate(self.bank.modules):
                    per_module[m][0].append(grads[2 * j])
                    per_module[m][1].append(grads[2 * j + 1])
        grads = {m: (torch.stack(gA), torch.stack(gB)) for m, (gA, gB) in per_module.items()}
        return dense_stats(grads, self.targets, self.bank)
