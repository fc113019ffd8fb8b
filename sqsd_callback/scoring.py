"""Per-module dots and norms → per-set projections P_i(D) → SQSD_i = mean danger − mean safety."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .bank import DirectionBank
from .types import Stats

METRICS = ("cosine", "projection", "global_cosine")


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; choose one of {METRICS} ('cosine' is the paper's).")
    return metric


def module_cosines(dots: torch.Tensor, sq: torch.Tensor, bank: DirectionBank) -> torch.Tensor:
    """cos(ΔW_m, V_m,k) per module and set (…×M×K) from dots (…×M×K) and squared norms ‖ΔW_m‖² (…×M); 0 where
    the set has no direction for the module or ΔW_m = 0."""
    present, v_norm = bank.present.to(dots.device), bank.v_norm.to(dots.device)
    w_norm = sq.clamp(min=0).sqrt()[..., None]
    safe_v = torch.where(present, v_norm, torch.ones_like(v_norm))
    cos = torch.where(w_norm > 0, dots / (w_norm.clamp(min=1e-300) * safe_v), torch.zeros_like(dots))
    return cos * present


def module_projections(dots: torch.Tensor, bank: DirectionBank) -> torch.Tensor:
    """<ΔW_m, V_m,k>/‖V_m,k‖ per module and set (…×M×K); 0 where the set has no direction for the module."""
    present, v_norm = bank.present.to(dots.device), bank.v_norm.to(dots.device)
    return dots / torch.where(present, v_norm, torch.ones_like(v_norm)) * present


def global_cosine(dots: torch.Tensor, sq: torch.Tensor, bank: DirectionBank) -> torch.Tensor:
    """One cosine per set (…×K) between ΔW and V over the modules the set covers, all of them concatenated."""
    present, v_norm = bank.present.to(dots.device), bank.v_norm.to(dots.device)
    w_norm = (sq[..., None] * present).sum(-2).clamp(min=0).sqrt()
    v_tot = (v_norm.pow(2) * present).sum(0).sqrt()
    num = (dots * present).sum(-2)
    return torch.where(w_norm > 0, num / (w_norm.clamp(min=1e-300) * v_tot), torch.zeros_like(num))


def global_projection(dots: torch.Tensor, bank: DirectionBank) -> torch.Tensor:
    """The signed length of ΔW along each set (…×K), all modules the set covers concatenated: <ΔW, V>/‖V‖."""
    present, v_norm = bank.present.to(dots.device), bank.v_norm.to(dots.device)
    return (dots * present).sum(-2) / (v_norm.pow(2) * present).sum(0).sqrt().clamp(min=1e-300)


def project(stats: Stats, bank: DirectionBank, metric: str, scale: torch.Tensor | None = None) -> torch.Tensor:
    """P_i(D_k) for every example i and set k, shape (n, K), float64.

    cosine: Σ_m cos(ΔW_i,m, V_m); projection: Σ_m <ΔW_i,m, V_m>/‖V_m‖; global_cosine: one cosine over all
    modules the set covers. ``scale[i]`` rescales example i's update to its batch-size-1 size (only
    ``projection`` depends on it).
    """
    dots, sq = stats.dots.double(), stats.sq.double()
    if scale is not None:
        s = scale.double().to(dots.device)
        dots, sq = dots * s[:, None, None], sq * s[:, None] ** 2
    if metric == "projection":
        return module_projections(dots, bank).sum(1)
    if metric == "cosine":
        return module_cosines(dots, sq, bank).sum(1)
    if metric == "global_cosine":
        return global_cosine(dots, sq, bank)
    raise ValueError(check_metric(metric))


def combine(values: Sequence[float], kinds: Sequence[str]) -> dict[str, float | None]:
    """The paper's combination of per-set values: ``danger`` and ``safety``, the mean over the sets of each kind
    (None where there is no set of that kind), and ``sqsd`` = danger − safety (a missing kind counts as 0). The one
    place the kinds are combined: example scores, offline rows and the run's drift all use it."""
    out: dict[str, float | None] = {}
    for kind in ("danger", "safety"):
        vals = [v for v, k in zip(values, kinds) if k == kind]
        out[kind] = sum(vals) / len(vals) if vals else None
    out["sqsd"] = (out["danger"] or 0.0) - (out["safety"] or 0.0)
    return out


def rows(proj: torch.Tensor, bank: DirectionBank, n_scored: torch.Tensor, index: list) -> list[dict]:
    """One dict per example: ``danger``/``safety`` (means over sets of that kind, None where the kind has no
    set), ``sqsd`` and every set's own value; all None for an example with no scored tokens."""
    kinds = [s.kind for s in bank.sets]
    out = []
    for i, p in enumerate(proj.tolist()):
        row = {"index": index[i] if i < len(index) else None}
        if int(n_scored[i]) == 0:
            row.update({"danger": None, "safety": None, "sqsd": None, **{k: None for k in bank.keys}})
            out.append(row)
            continue
        row.update(combine(p, kinds))
        row.update(dict(zip(bank.keys, p)))
        out.append(row)
    return out


def riskiest(score_rows: list[dict], k: int) -> list[dict]:
    """The k examples with the highest SQSD, each at its latest score."""
    latest = {}
    for r in score_rows:
        if r.get("sqsd") is not None:
            latest[r["index"]] = r
    return sorted(latest.values(), key=lambda r: r["sqsd"], reverse=True)[:k]
