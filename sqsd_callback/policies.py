"""Decisions from scores and drift: which examples to drop, when to stop, and the AsFT anchor penalty. Each is a
``Policy``: it describes its settings (run.json, the wandb config) and carries its state through checkpoints; its
action on the update is in ``edits`` (drops, anchor) or the callback's stop."""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

import torch

from .directions import DirectionSet
from .layers import LoraTarget, Target


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


class Policy:
    """What every policy offers the callback: a ``name``, its settings, and its state for checkpoints."""

    name = ""
    settings: tuple[str, ...] = ()

    def describe(self) -> dict:
        return {k: getattr(self, k) for k in self.settings}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved (nothing by default)."""


RECENT = 4096
"""Scores the robust z-score's median and MAD are taken over (the most recent: memory stays flat on long runs)."""


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
    name = "drop"
    settings = ("above", "top_fraction", "zscore_above", "min_history", "exclude_dropped", "zscore_robust")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.above, self.top_fraction, self.zscore_above))

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

    def state_dict(self) -> dict:
        return {"stats": vars(self.stats).copy(), "recent": list(self.recent), "dropped": sorted(self.dropped),
                "owed": self.owed}

    def load_state_dict(self, state: dict) -> None:
        self.stats = RunningStats(**state["stats"])
        self.recent = deque(state.get("recent", ()), maxlen=RECENT)
        self.dropped = set(state["dropped"])
        self.owed = state.get("owed", 0.0)


@dataclass
class DriftStop(Policy):
    """Stop once the run's drift has been above ``threshold`` for ``patience`` consecutive optimizer steps;
    remembers the last step whose drift was below it."""

    threshold: float
    patience: int = 1
    streak: int = 0
    last_safe_step: int = 0
    name = "stop"
    settings = ("threshold", "patience")

    def update(self, step: int, drift: float) -> bool:
        """Record the drift after ``step`` optimizer steps; True when the run should stop."""
        if drift > self.threshold:
            self.streak += 1
        else:
            self.streak, self.last_safe_step = 0, step
        return self.streak >= self.patience

    def state_dict(self) -> dict:
        return {"streak": self.streak, "last_safe_step": self.last_safe_step}

    def load_state_dict(self, state: dict) -> None:
        self.streak, self.last_safe_step = state["streak"], state["last_safe_step"]


class Anchor(Policy):
    """AsFT's anchor (arXiv 2506.08473): λ Σ_m ‖(I − Ĉ_m) ΔW_m‖²_F with Ĉ = V Vᵀ/‖V‖_F and ΔW = s·B A the
    LoRA delta. Computed as s² tr(XᵀX · AAᵀ) with X = B − V(VᵀB)/‖V‖_F: r×r and out×r products only."""

    name = "anchor"

    def __init__(self, directions: DirectionSet, lam: float) -> None:
        directions.check_values()
        self.directions, self.lam = directions, lam

    def describe(self) -> dict:
        return {"set": self.directions.name, "lambda": self.lam}

    def bind(self, targets: dict[str, Target]) -> None:
        """Match the anchor's modules to the model's LoRA modules (same checks as scoring)."""
        if not all(isinstance(t, LoraTarget) for t in targets.values()):
            raise ValueError("The AsFT anchor constrains a LoRA update, but the model has no active LoRA layer: "
                             "wrap it with peft.get_peft_model(model, LoraConfig(...)) or drop anchor=.")
        self.modules = self.directions.match({m: t.shape for m, t in targets.items()})
        device = next(iter(targets.values())).A.device
        self.dirs = {m: self.directions.modules[m].to(device, torch.float32) for m in self.modules}
        self.norms = {m: math.sqrt(self.directions.modules[m].sq_norm()) for m in self.modules}
        self.targets = targets

    def penalty(self) -> torch.Tensor:
        """The penalty as a function of the current LoRA factors (differentiable)."""
        total = 0.0
        for m in self.modules:
            t, V = self.targets[m], self.dirs[m]
            B, A = t.B.float(), t.A.float()
            VtB = V.times_left(B.T).T                       # (in×r) = Vᵀ B, through V's factors
            X = B - V.times_right(VtB) / self.norms[m]      # out×r
            total = total + t.scaling ** 2 * ((X.T @ X) * (A @ A.T)).sum()
        return self.lam * total

    def add_grad(self) -> float:
        """Add the penalty's gradient to the LoRA factors' ``.grad`` (once per optimizer step); returns its value."""
        params = [p for m in self.modules for p in (self.targets[m].A, self.targets[m].B)]
        with torch.enable_grad():
            value = self.penalty()
            grads = torch.autograd.grad(value, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.grad = g.to(p.dtype) if p.grad is None else p.grad.add_(g.to(p.grad.dtype))
        return float(value)
