"""Cumulative drift of the run: θ_t − θ_0 against each direction set, in low-rank form.

For LoRA the merged delta is s·B A, so θ_t − θ_0 = P Q with P = [s B_t, −s B_0] (out×2r) and Q = [A_t; A_0]
(2r×in): <PQ, V> = <Q, Pᵀ V> and ‖PQ‖² = <PᵀP, QQᵀ>, never an out×in matrix.
"""

from __future__ import annotations

import math

import torch

from .directions import DirectionBank
from .modules import LoraTarget


class Drift:
    """Remembers θ_0's LoRA factors and measures θ_t − θ_0 against every set, per module and in total."""

    def __init__(self, targets: dict[str, LoraTarget], bank: DirectionBank) -> None:
        self.targets, self.bank = targets, bank
        self.start = {m: tuple(t.clone().float() for t in targets[m].delta()) for m in bank.modules}

    def state_dict(self) -> dict:
        return {"start": {m: [t.cpu() for t in ts] for m, ts in self.start.items()}}

    def load_state_dict(self, state: dict) -> None:
        device = next(iter(self.start.values()))[0].device
        self.start = {m: tuple(t.to(device) for t in ts) for m, ts in state["start"].items()}

    @torch.no_grad()
    def measure(self) -> dict:
        """``{"cosine": [K], "projection": [K], "layers": {module: {"cosine": [K], "projection": [K]}}}``:
        cosine of θ_t − θ_0 with each set (over the modules the set covers) and its signed length along the set."""
        K = len(self.bank.sets)
        dots = torch.zeros(len(self.bank.modules), K, dtype=torch.float64)
        sq = torch.zeros(len(self.bank.modules), dtype=torch.float64)
        for j, m in enumerate(self.bank.modules):
            B_t, A_t = (t.float() for t in self.targets[m].delta())
            B_0, A_0 = self.start[m]
            P, Q = torch.cat([B_t, -B_0], 1), torch.cat([A_t, A_0], 0)
            sq[j] = float(((P.T @ P) * (Q @ Q.T)).sum())
            for k, d in enumerate(self.bank.per_module[m]):
                if d is not None:
                    dots[j, k] = float((Q * d.times_left(P.T)).sum())
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
