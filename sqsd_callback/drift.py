"""Cumulative drift of the run: θ_t − θ_0 against each direction set, per module and in total.

LoRA modules are measured in low-rank form (never an out×in matrix), a group of layers at a time; full
fine-tuning against a copy of W_0, a module at a time (one out×in difference in memory). The per-module dots
and norms reach the host in one transfer and become cosines and projections.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .directions import DirectionBank
from .groups import Group, group_modules
from .modules import LinearTarget, LoraTarget, Target


def _lora_drift(group: Group, start: list) -> tuple[torch.Tensor, torch.Tensor]:
    """θ_t − θ_0 = P Q with P = [sB_t, −sB_0] (L×out×2r), Q = [A_t; A_0] (just sB_t, A_t where every θ_0 delta is
    zero): <PQ, B_V A_V> = Σ (Pᵀ B_V) ⊙ (Q A_Vᵀ), <PQ, V> = Σ Q ⊙ (Pᵀ V), ‖PQ‖² = <PᵀP, QQᵀ>."""
    scale = group.scaling(group.targets[0].B.device)
    P = torch.stack([t.B.detach() for t in group.targets]).float() * scale[:, None, None]
    Q = torch.stack([t.A.detach() for t in group.targets]).float()
    if any(s is not None for s in start):
        P = torch.cat([P, -torch.stack([torch.zeros_like(p) if s is None else s[0] for s, p in zip(start, P)])], 2)
        Q = torch.cat([Q, torch.stack([torch.zeros_like(q) if s is None else s[1] for s, q in zip(start, Q)])], 1)
    Pt = P.transpose(1, 2)
    dots = [group.block_sums(((Pt @ group.VB) * (Q @ group.VAt)).sum(1))] if group.low else []
    dots += [torch.stack([(q * (p.T @ d[k].dense)).sum() for p, q, d in zip(P, Q, group.dirs)])[:, None]
             for k in group.dense]
    return torch.cat(dots, 1), ((Pt @ P) * (Q @ Q.transpose(1, 2))).sum((1, 2))


def _linear_drift(group: Group, start: list) -> tuple[torch.Tensor, torch.Tensor]:
    """D = W_t − W_0 per module: <D, B_V A_V> = Σ B_V ⊙ (D A_Vᵀ), <D, V>, ‖D‖²."""
    dots, sq = [], []
    for i, (t, w0) in enumerate(zip(group.targets, start)):
        D = t.module.weight.detach().float() - w0.float()
        row = [group.block_sums(((D @ group.VAt[i]) * group.VB[i]).sum(0))] if group.low else []
        row += [(D * group.dirs[i][k].dense).sum()[None] for k in group.dense]
        dots.append(torch.cat(row))
        sq.append(D.pow(2).sum())
    return torch.stack(dots), torch.stack(sq)


MEASURES = {LoraTarget: _lora_drift, LinearTarget: _linear_drift}


class Drift:
    """Remembers θ_0 of every scored module and measures θ_t − θ_0 against every set, per module and in total."""

    def __init__(self, targets: dict[str, Target], bank: DirectionBank, gather=contextlib.nullcontext) -> None:
        """``gather()``: a context in which the targets' parameters hold their full values (FSDP2 and ZeRO-3 shard
        them), entered for θ_0 and each measurement."""
        self.targets, self.bank, self.gather = targets, bank, gather
        with gather():
            self.start = {m: targets[m].snapshot() for m in bank.modules}
        self.groups = group_modules(bank.modules, targets, bank)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """θ_0 as named tensors: ``<module>`` (a weight) or ``<module>/sB``, ``<module>/A`` (LoRA factors); modules
        that started at a zero delta have none."""
        out = {}
        for m, snap in self.start.items():
            if isinstance(snap, tuple):
                out[f"{m}/sB"], out[f"{m}/A"] = snap
            elif snap is not None:
                out[m] = snap
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        def start(m):
            device = self.targets[m].params[0].device
            if f"{m}/A" in tensors:
                return tensors[f"{m}/sB"].to(device), tensors[f"{m}/A"].to(device)
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
                group.put(*MEASURES[type(group.targets[0])](group, [self.start[m] for m in group.names]), dots, sq)
        both = torch.cat([dots, sq[:, None]], 1).double().cpu()  # one transfer (and wait) per step
        dots, sq = both[:, :-1], both[:, -1]
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

