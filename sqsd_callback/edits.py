"""Edits of the training step's gradients, the policies' actions on the update: a dropped example's gradient is
removed exactly as its micro-batch's backward finishes (under DDP, held until DDP has written its averages, then
summed over ranks and divided by W: exact by linearity), the step is renormalised from its N scored tokens to the
N' kept (over every process), and the AsFT anchor's gradient is added once the step's gradients are complete."""

from __future__ import annotations

import torch

from .distributed import Processes, after_queued_callbacks, grads_reduced_now
from .engines.base import Engine
from .policies import Anchor, DropPolicy
from .recorder import MicroBatch


def refuse_untracked(model: torch.nn.Module, params: list[torch.Tensor]) -> None:
    """Exact drops remove examples through the scored weights' gradients: refuse a model that trains others."""
    scored = {id(q) for q in params}
    others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in scored]
    if others:
        raise ValueError(f"Exact drops remove examples through the gradients of the scored weight matrices, but the "
                         f"model also trains {len(others)} other parameter(s), e.g. {others[:2]} (modules_to_save, "
                         f"embeddings, norms?). Freeze them or train without drops.")


class StepEdits:
    """Drops and the anchor acting on the gradients of the trained ``params``."""

    def __init__(self, drop: DropPolicy, anchor: Anchor | None, engine: Engine | None, procs: Processes,
                 params: list[torch.Tensor]) -> None:
        self.drop, self.anchor, self.engine, self.procs, self.params = drop, anchor, engine, procs, params
        self.anchor_value: float | None = None
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(p) -> (p, removal after DDP)

    def drop_examples(self, mb: MicroBatch) -> None:
        """Decide which of the scored micro-batch's rows to drop and remove their gradients. Every rank decides on
        every rank's rows of this micro-step (the same policy state everywhere, so z-score statistics and the
        dropped set agree) and keeps its own decisions."""
        mine = [(self.procs.rank, r["index"], r["sqsd"]) for r in mb.rows]
        every = self.procs.gather(mine)
        decisions = self.drop.decide([{"index": i, "sqsd": s} for _, i, s in every])
        own = [d for (rank, _, _), d in zip(every, decisions) if rank == self.procs.rank]
        for r, d in zip(mb.rows, own):
            r["dropped"] = d
        mb.kept_tokens = int((mb.batch.n_scored.cpu() * torch.tensor([not d for d in own])).sum())
        idx = torch.tensor([i for i, d in enumerate(own) if d], dtype=torch.long, device=mb.batch.input_ids.device)
        removed = list(self.engine.removed(idx))  # releases the engine's per-example tensors too
        if self.procs.reduces_in_backward and grads_reduced_now():
            for p, g in removed:
                held = self._held.get(id(p))
                self._held[id(p)] = (p, g if held is None else held[1] + g)
        else:
            _subtract(removed)

    def step_complete(self, step: list[MicroBatch]) -> None:
        """The step's last micro-batch has finished its backward: finish the edits once its gradients are
        complete (under DDP, after DDP's own reduction)."""
        if self.procs.reduces_in_backward:
            after_queued_callbacks(lambda: self._finish(step))
        else:
            self._finish(step)

    def _finish(self, step: list[MicroBatch]) -> None:
        if self.drop.active:
            held, self._held = list(self._held.values()), {}
            if held:  # every rank's removals, averaged as DDP averaged the gradients
                summed = self.procs.sum([g for _, g in held])
                _subtract([(p, g / self.procs.world) for (p, _), g in zip(held, summed)])
            self._renormalise(step)
        if self.anchor is not None:
            self.anchor_value = self.anchor.add_grad()

    def _renormalise(self, micro_batches: list[MicroBatch]) -> None:
        """Scale the step's remaining gradient from 1/N to 1/N' (N' the scored tokens left, over every process);
        skip the step (no gradient at all) when nothing is left."""
        step = [mb for mb in micro_batches if mb.rows is not None]
        weights = [float(mb.weight.mean()) for mb in step if mb.weight is not None]
        ranks = self.procs.gather([(len(weights) == len(step), weights)])  # every rank, so all decide alike
        every = [w for _, ws in ranks for w in ws]
        spread = bool(every) and max(every) - min(every) > 1e-4 * max(abs(w) for w in every)
        if spread or not all(read for read, _ in ranks):
            raise RuntimeError("Exact drops need the loss normalised by the step's scored-token count over every "
                               "process (num_items_in_batch, the Trainer's and SFTTrainer's default, with "
                               "TrainingArguments(average_tokens_across_devices=True) when training on several "
                               "processes); this run's micro-batches or processes weight tokens differently.")
        counts = torch.tensor([sum(int(mb.batch.n_scored.sum()) for mb in step),
                               sum(mb.kept_tokens for mb in step)], dtype=torch.float64)
        total, kept = (int(c) for c in self.procs.sum([counts])[0])
        with torch.no_grad():
            for p in self.params:
                if p.grad is None:
                    continue
                if kept == 0:
                    p.grad = None
                elif kept != total:
                    p.grad.mul_(total / kept)


@torch.no_grad()
def _subtract(removed: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for p, g in removed:
        if p.grad is not None:
            p.grad.sub_(g.to(p.grad.dtype))
