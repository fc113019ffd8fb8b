"""Drops: examples whose SQSD crosses a threshold are removed from the step's update exactly. A dropped example's
gradient is subtracted as its micro-batch's backward finishes (under DDP, held until DDP has written its averages,
under FSDP2 until the step's reduce-scatter, then summed over ranks and divided by W, each rank editing its shard:
exact by linearity), and the step is renormalised from its N scored
tokens to the N' kept (over every process), so the update equals that of a step without the dropped examples,
clipping included."""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

import torch

from ..runtime.distributed import add_to_grad, grads_reduced_now
from ..runtime.recorder import MicroBatch
from .base import Policy, RunContext

RECENT = 4096
"""Scores the robust z-score's median and MAD are taken over (the most recent: memory stays flat on long runs)."""


@dataclass
class RunningStats:
    """Mean and variance of every SQSD seen so far (Welford), for z-score drops."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.count += 1
        d = x - self.mean
        self.mean += d / self.count
        self.m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0


@dataclass
class DropPolicy(Policy):
    """Drop an example when its SQSD is above ``above``, among the riskiest ``top_fraction`` of its micro-batch
    (whole examples: the fraction's remainder carries to the next micro-batch, so the run drops that share),
    or more than ``zscore_above`` standard deviations above the run's running mean (once ``min_history``
    examples are seen; with ``zscore_robust``, median absolute deviations × 1.4826 above the median of the last
    ``RECENT`` scores including the micro-batch being judged, which the outliers being dropped barely move); with
    ``exclude_dropped`` a dropped example is dropped again whenever it comes back."""

    above: float | None = None
    top_fraction: float | None = None
    zscore_above: float | None = None
    min_history: int = 32
    exclude_dropped: bool = False
    zscore_robust: bool = False
    stats: RunningStats = field(default_factory=RunningStats)
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    dropped: set = field(default_factory=set)
    owed: float = 0.0  # top_fraction's share of examples not yet dropped (a micro-batch drops whole examples)
    name = tensors_key = "drop"
    settings = ("above", "top_fraction", "zscore_above", "min_history", "exclude_dropped", "zscore_robust")
    edits_gradients = True
    needs_rows = True

    # ------------------------------------------------------------ decisions
    def decide(self, rows: list[dict]) -> list[bool]:
        """Which of one micro-batch's rows to drop (rows without a score are never dropped)."""
        scores = [r["sqsd"] for r in rows]
        drop = [s is not None and self.exclude_dropped and r["index"] in self.dropped for s, r in zip(scores, rows)]
        if self.zscore_robust:  # the micro-batch joins its own reference: its few outliers barely move the median
            self._see(scores)   # and MAD, so it is judged from the first micro-batch on (no warm-up that trains them)
        center, scale = self._center_scale()
        for i, s in enumerate(scores):
            if s is None:
                continue
            if self.above is not None and s > self.above:
                drop[i] = True
            if scale and (s - center) / scale > self.zscore_above:
                drop[i] = True
        if self.top_fraction is not None:  # the fraction's remainder carries over: 10% of 8 drops 1 in 5 batches
            scored = sorted((s, i) for i, s in enumerate(scores) if s is not None)
            self.owed += self.top_fraction * len(scored)
            k = min(len(scored), int(self.owed + 1e-9))
            self.owed -= k
            for _, i in scored[len(scored) - k:]:
                drop[i] = True
        if not self.zscore_robust:
            self._see(scores)
        self.dropped.update(r["index"] for r, d in zip(rows, drop) if d and r["index"] is not None)
        return drop

    def _see(self, scores: list[float | None]) -> None:
        for s in scores:
            if s is not None:
                self.stats.add(s)
                self.recent.append(s)

    def _center_scale(self) -> tuple[float, float]:
        """The z-score's center and scale from the scores seen so far; scale 0 while the z-score does not act."""
        if self.zscore_above is None or self.stats.count < self.min_history:
            return 0.0, 0.0
        if not self.zscore_robust:
            return self.stats.mean, self.stats.std
        median = statistics.median(self.recent)
        return median, 1.4826 * statistics.median(abs(x - median) for x in self.recent)

    # ------------------------------------------------------- gradient edits
    def bind(self, run: RunContext) -> None:
        """Exact drops remove examples through the scored weights' gradients: refuse a model that trains others."""
        scored = {id(q) for q in run.params}
        others = [n for n, p in run.model.named_parameters() if p.requires_grad and id(p) not in scored]
        if others:
            raise ValueError(f"Exact drops remove examples through the gradients of the scored weight matrices, but "
                             f"the model also trains {len(others)} other parameter(s), e.g. {others[:2]} "
                             f"(modules_to_save, embeddings, norms?). Freeze them or train without drops.")
        self.run = run
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(p) -> (p, removal after DDP)

    def on_micro_batch(self, mb: MicroBatch) -> None:
        """Decide which of the scored micro-batch's rows to drop and remove their gradients. Every rank decides on
        every rank's rows of this micro-step (the same policy state everywhere, so z-score statistics and the
        dropped set agree) and keeps its own decisions."""
        procs = self.run.procs
        every = procs.gather([(procs.rank, r["index"], r["sqsd"]) for r in mb.rows])
        decisions = self.decide([{"index": i, "sqsd": s} for _, i, s in every])
        own = [d for (rank, _, _), d in zip(every, decisions) if rank == procs.rank]
        for r, d in zip(mb.rows, own):
            r["dropped"] = d
        mb.kept_tokens = int((mb.batch.n_scored.cpu() * torch.tensor([not d for d in own])).sum())
        idx = torch.tensor([i for i, d in enumerate(own) if d], dtype=torch.long, device=mb.batch.input_ids.device)
        removed = list(self.run.engine.removed(idx))  # releases the engine's per-example tensors too
        if procs.holds_edits or (procs.reduces_in_backward and grads_reduced_now()):
            for p, g in removed:
                held = self._held.get(id(p))
                self._held[id(p)] = (p, g if held is None else held[1] + g)
        else:
            _subtract(removed)

    def on_step_complete(self, step: list[MicroBatch]) -> None:
        held, self._held = list(self._held.values()), {}
        if held:  # every rank's removals, averaged as DDP averaged the gradients
            procs = self.run.procs
            summed = procs.sum([g for _, g in held])
            _subtract([(p, g) for (p, _), g in zip(held, summed)], 1 / procs.world)
        self._renormalise(step)

    def _renormalise(self, micro_batches: list[MicroBatch]) -> None:
        """Scale the step's remaining gradient from 1/N to 1/N' (N' the scored tokens left, over every process);
        skip the step (no gradient at all) when nothing is left."""
        procs = self.run.procs
        step = [mb for mb in micro_batches if mb.rows is not None]
        weights = [float(mb.weight.mean()) for mb in step if mb.weight is not None]
        ranks = procs.gather([(len(weights) == len(step), weights)])  # every rank, so all decide alike
        every = [w for _, ws in ranks for w in ws]
        spread = bool(every) and max(every) - min(every) > 1e-4 * max(abs(w) for w in every)
        if spread or not all(read for read, _ in ranks):
            raise RuntimeError("Exact drops need the loss normalised by the step's scored-token count over every "
                               "process (num_items_in_batch, the Trainer's and SFTTrainer's default, with "
                               "TrainingArguments(average_tokens_across_devices=True) when training on several "
                               "processes); this run's micro-batches or processes weight tokens differently.")
        counts = torch.tensor([sum(int(mb.batch.n_scored.sum()) for mb in step),
                               sum(mb.kept_tokens for mb in step)], dtype=torch.float64)
        total, kept = (int(c) for c in procs.sum([counts])[0])
        with torch.no_grad():
            for p in self.run.params:
                if p.grad is None:
                    continue
                if kept == 0:
                    p.grad = None
                elif kept != total:
                    p.grad.mul_(total / kept)

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"stats": vars(self.stats).copy(), "recent": list(self.recent), "dropped": sorted(self.dropped),
                "owed": self.owed}

    def load_state_dict(self, state: dict) -> None:
        self.stats = RunningStats(**state.get("stats", {}))
        self.recent = deque(state.get("recent", ()), maxlen=RECENT)
        self.dropped = set(state.get("dropped", ()))
        self.owed = state.get("owed", 0.0)


def _subtract(removed: list[tuple[torch.Tensor, torch.Tensor]], scale: float = 1.0) -> None:
    """Take ``scale``·g off each parameter's gradient (a parameter without one has nothing to take off)."""
    for p, g in removed:
        if p.grad is not None:
            add_to_grad(p, g, -scale)
