"""Per-module dots and norms → per-set projections P_i(D) → SQSD_i = mean danger − mean safety."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .directions import DirectionBank
from .engines.base import Stats

METRICS = ("cosine", "projection", "global_cosine")


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; choose one of {METRICS} ('cosine' is the paper's).")
    return metric


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
    present = bank.present.to(dots.device)
    v_norm = bank.v_norm.to(dots.device)
    safe_v = torch.where(present, v_norm, torch.ones_like(v_norm))
    if metric == "projection":
        return (dots / safe_v).mul(present).sum(1)
    if metric == "cosine":
        w_norm = sq.clamp(min=0).sqrt()[:, :, None]
        cos = torch.where(w_norm > 0, dots / (w_norm.clamp(min=1e-300) * safe_v), torch.zeros_like(dots))
        return cos.mul(present).sum(1)
    if metric == "global_cosine":
        w_norm = (sq[:, :, None] * present).sum(1).clamp(min=0).sqrt()
        v_tot = (v_norm.pow(2) * present).sum(0).sqrt()
        num = (dots * present).sum(1)
        return torch.where(w_norm > 0, num / (w_norm.clamp(min=1e-300) * v_tot), torch.zeros_like(num))
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


def score_samples(
    model,
    samples,
    danger=(),
    safety=(),
    metric: str = "cosine",
    engine: str = "hooks",
    batch_size: int = 8,
    progress: bool = True,
    max_tokens: int | None = None,
) -> list[dict]:
    """SQSD of every sample at the model's current parameters, one row per sample in input order.

    ``samples``: dicts with ``input_ids`` and ``labels`` (−100 = not scored), optional ``attention_mask`` and
    ``index`` (defaults to the sample's position); batches group samples of similar length, at most
    ``batch_size`` of them and, with ``max_tokens``, at most that many padded tokens (long examples go in smaller
    batches, so activation memory stays bounded; a longer example goes alone). Each example is
    scored as the paper does, by its own mean-loss gradient at batch size 1, without dropout; the model's
    parameters, ``.grad`` and train/eval mode are left as found.
    """
    from tqdm.auto import tqdm

    from .directions import DirectionBank
    from .engines import make_engine
    from .engines.base import collate
    from .layers import find_targets

    check_metric(metric)
    samples = list(samples)
    if not samples:
        raise ValueError("score_samples got no samples.")
    targets = find_targets(model)
    device = next(iter(targets.values())).params[0].device
    bank = DirectionBank([*danger, *safety], {m: t.shape for m, t in targets.items()}).to(device)
    scorer = make_engine(engine, targets, bank, model=model)
    out: list[dict] = [{} for _ in samples]
    batches = length_batches([len(s.get("input_ids", ())) for s in samples], batch_size, max_tokens)
    for positions in tqdm(batches, desc=f"sqsd score ({engine})", disable=not progress or len(batches) < 2):
        chunk = [samples[i] for i in positions]
        batch = collate(chunk)
        batch.index = [s.get("index", i) for i, s in zip(positions, chunk)]
        stats = scorer.compute(model, batch.to(device))
        for i, row in zip(positions, rows(project(stats, bank, metric), bank, batch.n_scored, batch.index)):
            out[i] = row
    return out


def length_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Positions grouped by length (little padding): at most ``batch_size`` per batch and, with ``max_tokens``, at
    most that many padded tokens (batch size × its longest example); an example longer than ``max_tokens`` alone."""
    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"batch_size and max_tokens must be positive, got {batch_size} and {max_tokens}")
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        last = batches[-1] if batches else None
        fits = last is not None and len(last) < batch_size and (
            max_tokens is None or (len(last) + 1) * lengths[i] <= max_tokens)  # i is the longest so far
        if fits:
            last.append(i)
        else:
            batches.append([i])
    return batches
