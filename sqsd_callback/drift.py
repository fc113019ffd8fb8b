"""Cumulative drift of the run: θ_t − θ_0 against each direction set, per module and in total.

Each layer kind measures a group of its layers (``sqsd_callback.layers``): LoRA in low-rank form (never an out×in
matrix), full fine-tuning against a copy of W_0, a module at a time (one out×in difference in memory). The
per-module dots and norms reach the host in one transfer and become cosines and projections.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .bank import DirectionBank
from .groups import group_modules
from .layers import Sampled, kind_of
from .scoring import combine, global_cosine, global_projection, module_cosines, module_projections
from .types import Target


class Drift:
    """Remembers θ_0 of every scored module and measures θ_t − θ_0 against every set, per module and in total."""

    def __init__(self, targets: dict[str, Target], bank: DirectionBank, gather=contextlib.nullcontext,
                 sample: int = 1) -> None:
        """``gather()``: a context in which the targets' parameters hold their full values (FSDP2 and ZeRO-3 shard
        them), entered for θ_0 and each measurement. ``sample`` > 1 keeps a fully trained weight's θ_0 at one entry
        in about that many (``SQSDConfig.drift_sample``)."""
        self.targets, self.bank, self.gather, self.sample = targets, bank, gather, sample
        with gather():
            self.start = {m: targets[m].snapshot(sample) for m in bank.modules}
        self.groups = group_modules(bank.modules, targets, bank)
        if any(isinstance(s, Sampled) for s in self.start.values()):
            self.measure()  # at θ_0: sampled starts take their dots with the sets

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """θ_0 as named tensors: ``<module>`` (a weight), ``<module>/sB``, ``<module>/A`` (LoRA factors) or
        ``<module>/sample``, ``<module>/sample_dots`` (a sampled weight); modules that started at a zero delta have
        none."""
        out = {}
        for m, snap in self.start.items():
            if isinstance(snap, tuple):
                out[f"{m}/sB"], out[f"{m}/A"] = snap
            elif isinstance(snap, Sampled):
                out[f"{m}/sample"], out[f"{m}/sample_dots"] = snap.values, snap.dots
            elif snap is not None:
                out[m] = snap
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        def start(m):
            device = self.targets[m].params[0].device
            if f"{m}/A" in tensors:
                return tensors[f"{m}/sB"].to(device), tensors[f"{m}/A"].to(device)
            if isinstance(self.start[m], Sampled) != (f"{m}/sample" in tensors) or (
                    f"{m}/sample" in tensors and len(tensors[f"{m}/sample"]) != len(self.start[m].values)):
                raise ValueError(f"The checkpoint's drift state keeps θ_0 of {m} with another drift_sample than "
                                 f"this run's ({self.sample}): resume with the drift_sample the run started with.")
            if f"{m}/sample" in tensors:
                return Sampled(tensors[f"{m}/sample"].to(device), self.start[m].stride,
                               tensors[f"{m}/sample_dots"].to(device))
            return tensors[m].to(device) if m in tensors else None
        self.start = {m: start(m) for m in self.bank.modules}

    @torch.no_grad()
    @torch.profiler.record_function("sqsd::drift")
    def measure(self) -> dict:
        """``{"cosine": [K], "projection": [K], "layers": {module: {"cosine": [K], "projection": [K]}}}``:
        cosine of θ_t − θ_0 with each set (over the modules the set covers) and its signed length along the set."""
        device = self.targets[self.bank.modules[0]].params[0].device
        dots = torch.zeros(len(self.bank.modules), len(self.bank.sets), device=device)
        sq = torch.zeros(len(self.bank.modules), device=device)
        with self.gather():
            for group in self.groups:
                group.put(*kind_of(group.targets[0]).drift(group, [self.start[m] for m in group.names]), dots, sq)
        both = torch.cat([dots, sq[:, None]], 1).double().cpu()  # one transfer (and wait) per step
        dots, sq = both[:, :-1], both[:, -1]
        layer_cos, layer_proj = module_cosines(dots, sq, self.bank), module_projections(dots, self.bank)
        return {
            "cosine": global_cosine(dots, sq, self.bank).tolist(),
            "projection": global_projection(dots, self.bank).tolist(),
            "norm": math.sqrt(float(sq.sum())),
            "layers": {m: {"cosine": layer_cos[j].tolist(), "projection": layer_proj[j].tolist()}
                       for j, m in enumerate(self.bank.modules)},
        }

    def step_row(self, step: int, epoch: float | None) -> tuple[dict[str, float | None], dict]:
        """Measure after optimizer step ``step``: the run-level scalars (``summarize``) and drift.jsonl's row."""
        measured = self.measure()
        scalars = summarize(measured, self.bank)
        row = {"step": step, "epoch": epoch, **scalars,
               **{f"cosine/{k}": v for k, v in zip(self.bank.keys, measured["cosine"])},
               **{f"projection/{k}": v for k, v in zip(self.bank.keys, measured["projection"])},
               "norm": measured["norm"], "layers": measured["layers"]}
        return scalars, row


def summarize(measured: dict, bank: DirectionBank) -> dict[str, float | None]:
    """The run-level scalars: drift toward danger and safety (mean cosine over sets of each kind; None without a
    set of that kind) and ``drift = danger − safety``, the run-level analogue of SQSD (``scoring.combine``)."""
    both = combine(measured["cosine"], [s.kind for s in bank.sets])
    return {"drift_danger": both["danger"], "drift_safety": both["safety"], "drift": both["sqsd"]}
