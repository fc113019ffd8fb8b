"""Cumulative drift of the run: θ_t − θ_0 against each direction set, per module and in total.

Each target measures its own difference (LoRA in low-rank form, never an out×in matrix; full fine-tuning
against a copy of W_0); this module turns the per-module dots and norms into cosines and projections.
"""

from __future__ import annotations

import math

import torch

from .directions import DirectionBank
from .modules import Target


class Drift:
    """Remembers θ_0 of every scored module and measures θ_t − θ_0 against every set, per module and in total."""

    def __init__(self, targets: dict[str, Target], bank: DirectionBank) -> None:
        self.targets, self.bank = targets, bank
        self.start = {m: targets[m].snapshot() for m in bank.modules}

    def state_dict(self) -> dict:
        return {"start": {m: _to(s, "cpu") for m, s in self.start.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.start = {m: _to(s, self.targets[m].params[0].device) for m, s in state["start"].items()}

    @torch.no_grad()
    def measure(self) -> dict:
        """``{"cosine": [K], "projection": [K], "layers": {module: {"cosine": [K], "projection": [K]}}}``:
        cosine of θ_t − θ_0 with each set (over the modules the set covers) and its signed length along the set."""
        K = len(self.bank.sets)
        dots = torch.zeros(len(self.bank.modules), K, dtype=torch.float64)
        sq = torch.zeros(len(self.bank.modules), dtype=torch.float64)
        for j, m in enumerate(self.bank.modules):
            d, sq[j] = self.targets[m].drift(self.start[m], self.bank.per_module[m])
            dots[j] = torch.tensor(d, dtype=torch.float64)
        present = self.bank.present
        v_norm = self.bank.v_norm
        w_norm = sq.sqrt()[:, None]
        layer_cos = torch.where(present & (w_norm > 0), dots / (w_norm * v_norm).clamp(min=1e-300), 0.0)
        layer_proj = torch.where(present, dots / v_norm.clamp(min=1e-300), 0.0)
        tot_w = (sq[:, None] * present).sum(0).sqrt()
        tot_v = (v_norm.pow(2) * present).sum(0).sqrt()
        num = (dots * present).sum(0)
        cos = torch.where(tot_w > 0, num / (tot_w * tot_v).clamp(min=1e-300), 0.0)
        return {
            "cosine": cos.tolist(),
            "projection": (num / tot_v).tolist(),
            "norm": math.sqrt(float(sq.sum())),
            "layers": {m: {"cosine": layer_cos[j].tolist(), "projection": layer_proj[j].tolist()}
                       for j, m in enumerate(self.bank.modules)},
        }


def summarize(measured: dict, bank: DirectionBank) -> dict[str, float]:
    """The run-level scalars: drift toward danger and safety (mean cosine over sets of each kind) and
    ``drift = danger − safety``, the run-level analogue of SQSD."""
    out = {}
    for kind in ("danger", "safety"):
        vals = [c for c, s in zip(measured["cosine"], bank.sets) if s.kind == kind]
        out[f"drift_{kind}"] = sum(vals) / len(vals) if vals else 0.0
    out["drift"] = out["drift_danger"] - out["drift_safety"]
    return out


def _to(snapshot, device):
    return tuple(t.to(device) for t in snapshot) if isinstance(snapshot, tuple) else snapshot.to(device)
