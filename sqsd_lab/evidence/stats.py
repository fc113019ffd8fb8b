"""Intervals and decisions from per-prompt outcomes over seeds: a two-level bootstrap, paired differences against a
reference condition (the clean run), and an equivalence test (TOST) at a margin.

Outcomes come as ``{seed: [value per prompt]}`` (1.0 harmful, 0.0 not; or any per-prompt number). Min–max over a few
seeds is no interval: the bootstrap resamples seeds, then prompts within each drawn seed, so both sources of
variation widen the interval; percentile intervals, from a fixed RNG seed so a table is reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Outcomes = Mapping[int, Sequence[float]]
MARGIN = 0.05
"""The default equivalence margin: ± this difference in rate counts as "as safe as the reference"."""


@dataclass(frozen=True)
class Interval:
    """A point estimate (mean of per-seed means) and its percentile bootstrap interval at ``level``."""

    mean: float
    low: float
    high: float
    level: float


@dataclass(frozen=True)
class Equivalence:
    """A TOST decision: equivalent when the (1 − 2α) interval of the paired difference lies inside ±margin."""

    equivalent: bool
    difference: Interval
    margin: float
    alpha: float


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of ``values``, ties given their average rank."""
    x = np.asarray(values, dtype=float)
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ (Pearson's on average ranks); None where either side is constant."""
    a, b = average_ranks(x), average_ranks(y)
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / den if den else None


def mean_present(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None (None where none is): a measure averaged over the runs that have it."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _seeds(outcomes: Outcomes, what: str) -> list[np.ndarray]:
    """The per-seed arrays of ``outcomes`` in seed order; raise where a seed has no prompts or there are no seeds."""
    if not outcomes:
        raise ValueError(f"{what}: no seeds; pass {{seed: [per-prompt outcome, ...]}}")
    arrays = [np.asarray(outcomes[s], dtype=float) for s in sorted(outcomes)]
    empty = [s for s, a in zip(sorted(outcomes), arrays) if a.size == 0]
    if empty:
        raise ValueError(f"{what}: seed {empty[0]} has no per-prompt outcomes")
    return arrays


def point(outcomes: Outcomes) -> float:
    """The mean over seeds of each seed's mean over prompts."""
    return float(np.mean([a.mean() for a in _seeds(outcomes, "point")]))


def bootstrap(outcomes: Outcomes, level: float = 0.95, n_boot: int = 4000, rng_seed: int = 0) -> Interval:
    """Two-level percentile bootstrap of the mean of per-seed means: each replicate draws the seeds with replacement,
    then, for each drawn seed, its prompts with replacement."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), not {level}")
    arrays = _seeds(outcomes, "bootstrap")
    rng = np.random.default_rng(rng_seed)
    drawn = rng.integers(0, len(arrays), size=(n_boot, len(arrays)))
    means = np.empty(drawn.shape)
    for column in range(drawn.shape[1]):
        for k, values in enumerate(arrays):
            rows = np.flatnonzero(drawn[:, column] == k)
            picks = rng.integers(0, values.size, size=(rows.size, values.size))
            means[rows, column] = values[picks].mean(axis=1)
    replicates = means.mean(axis=1)
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return Interval(point(outcomes), float(low), float(high), level)


def interval(values_by_seed: Outcomes) -> dict | None:
    """``bootstrap``'s mean and 95 % interval as a results record (``mean``, ``ci_low``, ``ci_high``); None without
    values."""
    if not values_by_seed or not all(len(v) for v in values_by_seed.values()):
        return None
    i = bootstrap(values_by_seed)
    return {"mean": i.mean, "ci_low": i.low, "ci_high": i.high}


def paired_differences(condition: Outcomes, reference: Outcomes) -> dict[int, list[float]]:
    """Per seed, per prompt: condition − reference, paired by seed and by prompt position (the same prompts in the
    same order in both runs of a seed)."""
    missing = sorted(set(condition) ^ set(reference))
    if missing:
        raise ValueError(f"seed {missing[0]} is in only one of the condition and the reference; pair every seed "
                         "with its reference run")
    out = {}
    for s in sorted(condition):
        c, r = list(condition[s]), list(reference[s])
        if len(c) != len(r):
            raise ValueError(f"seed {s}: {len(c)} condition outcomes against {len(r)} reference outcomes; judge the "
                             "same prompts in both runs")
        out[s] = [x - y for x, y in zip(c, r)]
    return out


def per_seed_differences(condition: Outcomes, reference: Outcomes) -> dict[int, float]:
    """Per seed: the condition's rate − the reference's rate."""
    return {s: float(np.mean(d)) for s, d in paired_differences(condition, reference).items()}


def equivalence(condition: Outcomes, reference: Outcomes, margin: float = MARGIN, alpha: float = 0.05,
                n_boot: int = 4000, rng_seed: int = 0) -> Equivalence:
    """TOST on the paired differences: the two one-sided tests at level α both reject (difference ≤ −margin, and
    ≥ +margin) exactly when the (1 − 2α) two-level bootstrap interval of the mean paired difference lies strictly
    inside (−margin, +margin); returns the decision and that interval."""
    if margin <= 0 or not 0 < alpha < 0.5:
        raise ValueError(f"need margin > 0 and 0 < alpha < 0.5, not margin={margin}, alpha={alpha}")
    diff = bootstrap(paired_differences(condition, reference), 1 - 2 * alpha, n_boot, rng_seed)
    return Equivalence(-margin < diff.low and diff.high < margin, diff, margin, alpha)
