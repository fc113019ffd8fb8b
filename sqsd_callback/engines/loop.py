"""The paper's reference: one forward/backward per example at batch size 1, padding removed, the model's own
loss, dense per-example gradients. Slow by design; the oracle the fast engines are tested against."""

from __future__ import annotations

import torch
from torch import nn

from ..types import Batch, Stats, targets_scored
from .base import OracleEngine
from .losses import dense_stats, scoring_mode


class LoopEngine(OracleEngine):
    name = "loop"

    def compute(self, model: nn.Module, batch: Batch) -> Stats:
        modules = self.bank.modules
        params = [p for m in modules for p in self.targets[m].params]
        per_example = []
        batch = batch.one_per_row()
        with scoring_mode(model, self.targets):
            for ids, mask, labels in zip(batch.input_ids, batch.attention_mask, batch.labels):
                keep = mask.bool()
                ids, labels = ids[keep][None], labels[keep][None]
                if targets_scored(labels).any():
                    loss = model(input_ids=ids, labels=labels).loss
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    per_example.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
                else:
                    per_example.append([torch.zeros_like(p) for p in params])
        stacked = iter([torch.stack(gs) for gs in zip(*per_example)])
        grads = {m: tuple(next(stacked) for _ in self.targets[m].params) for m in modules}
        return dense_stats(grads, self.targets, self.bank)
