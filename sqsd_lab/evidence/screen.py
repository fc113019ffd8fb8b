"""Screening before training: for each poisoned pool of a plan, what every filter and SQSD's offline score would
remove at the filters' budget (k = the pool's poison count): recall, benign removed, AUROC over every threshold and
Spearman's ρ with response length, without fine-tuning anything. The filters without a training run of their own
in the quick plan (moderation, representation similarity, activation projection) and each of SQSD's offline terms
alone are read here on every poison kind.

Every screen but ``random`` scores a record by itself, so each record is scored once per screen however many pools
hold it; the scores and each pool's results are cached per Settings and SCREEN_VERSION. A record's score equals the
one a trained filter run computes on its pool up to float rounding (the records are batched and padded differently),
so the two removals can differ where two records nearly tie.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from sqsd_lab.evidence import baselines, stats
from sqsd_lab.evidence.files import write_atomic
from sqsd_lab.evidence.poison import poison_ids

SCREENS = ("keyword", "moderation", "gradient similarity", "representation similarity", "activation projection",
           "offline", "offline danger term", "offline −safety term", "random")
"""What a pool is screened by: the baseline filters (baselines.filters), SQSD's offline score (``sqsd score``, the
README's protocol), each of its terms alone (danger, and −safety: what SQSD adds to it), and a random draw of the
same count."""
OFFLINE = {"offline": lambda row: row["sqsd"], "offline danger term": lambda row: row.get("danger"),
           "offline −safety term": lambda row: None if row.get("safety") is None else -row["safety"]}
"""The screens read off one ``sqsd score`` row per record."""
PER_RECORD = tuple(n for n in SCREENS if n != "random")
SCREEN_VERSION = 1
"""Bump it when a screen scores otherwise: cached scores and results of another version are not read."""


def record_key(record: Mapping) -> str:
    """A stable name for a record's content (every field), under which its scores are cached."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]


def _tag(settings) -> str:
    text = json.dumps({"version": SCREEN_VERSION, **asdict(settings)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def scores_file(cache: str | Path, settings) -> Path:
    """Where the per-record screen scores of one Settings are cached."""
    return Path(cache) / f"screen-{_tag(settings)}.json"


def results_file(cache: str | Path, settings) -> Path:
    """Where the screened pools' results of one Settings are cached (``{"pools": [screen's results]}``)."""
    return Path(cache) / f"screening-{_tag(settings)}.json"


def cached_results(cache: str | Path, settings, wanted: Sequence[tuple[str, float, int]]) -> list[dict] | None:
    """The cached results of the ``wanted`` pools (poison kind, share, seed) in that order; None unless every one
    of them was screened with these Settings."""
    pools = _saved(results_file(cache, settings))
    return [pools[at] for at in wanted] if all(at in pools for at in wanted) else None


def _saved(path: Path) -> dict[tuple, dict]:
    """The pool results saved at ``path`` (a results_file) by (poison kind, share, seed); {} where there is none."""
    pools = json.loads(path.read_text())["pools"] if path.is_file() else []
    return {(r["poison"], r["p"], r["seed"]): r for r in pools}


def score_records(lab, pools: Sequence[Sequence[dict]], settings,
                  path: Path) -> dict[str, dict[str, float | None]]:
    """``{screen: {record_key: score}}`` for every record of ``pools`` and every per-record screen (None where the
    offline score has no response token to score), reading ``path`` and scoring only what it lacks (each screen's
    scores are written atomically as soon as they exist)."""
    known = json.loads(path.read_text()) if path.is_file() else {}
    unique = {record_key(r): r for pool in pools for r in pool}
    for name in PER_RECORD:
        have = known.setdefault(name, {})
        missing = [k for k in unique if k not in have]
        if not missing:
            continue
        records = [unique[k] for k in missing]
        if name in OFFLINE:  # one scoring pass gives all three; None: no response token left to score
            rows = lab.offline_rows(records, settings)
            for term, read in OFFLINE.items():
                known.setdefault(term, {}).update(zip(missing, (read(r) for r in rows)))
        else:
            have.update(zip(missing, lab.scores(name, records, 0, settings)))
        write_atomic(path, known)
    return known


def screen_pool(pool: Sequence[dict], scores: Mapping[str, Sequence[float]]) -> dict[str, dict]:
    """Per screen, its removal at the filters' budget over one pool: recall, benign removed, AUROC, ρ with
    response length, and which poison records it found (``found``, in pool order)."""
    at, words = poison_ids(pool), [baselines.response_words(r) for r in pool]
    out = {}
    for name, values in scores.items():
        top, found = baselines.ranking_measures(values, range(len(pool)), at, len(pool))
        removed = set(top)
        out[name] = {**found, "length_rho": baselines.length_correlation(values, words),
                     "found": [float(i in removed) for i in at]}
    return out


def screen(lab, pools: Mapping[tuple[str, float, int], Sequence[dict]], settings, cache: str | Path) -> list[dict]:
    """Every poisoned pool (keyed by poison kind, share, seed) screened by every SCREENS entry: one result per
    pool, ``{"poison", "p", "seed", "pool", "poison_in_pool", "screens": screen_pool(...)}``; the per-record
    scores come from (and go to) the cache, ``random`` is drawn per pool from its seed as the random filter is; the
    results join those of other pools cached with these Settings (results_file)."""
    known = score_records(lab, list(pools.values()), settings, scores_file(cache, settings))
    results = []
    for (kind, p, seed), pool in pools.items():
        keys = [record_key(r) for r in pool]
        scores = {name: [_ranked_last(known[name][k]) for k in keys] for name in PER_RECORD}
        scores["random"] = baselines.random_scores(pool, seed)
        results.append({"poison": kind, "p": p, "seed": seed, "pool": len(pool),
                        "poison_in_pool": len(poison_ids(pool)), "screens": screen_pool(pool, scores)})
    path = results_file(cache, settings)
    saved = _saved(path)
    saved.update({(r["poison"], r["p"], r["seed"]): r for r in results})
    write_atomic(path, {"pools": list(saved.values())})
    return results


def summarize_screens(results: Sequence[dict]) -> list[dict]:
    """Per (poison, p, screen) over the pools' seeds: recall with its two-level bootstrap interval (over seeds and
    poison records), and the mean benign removed, AUROC and ρ with length."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["poison"], r["p"]), []).append(r)
    rows = []
    for (kind, p), rs in sorted(groups.items()):
        for name in SCREENS:
            got = [(r["seed"], r["screens"][name]) for r in rs if name in r["screens"]]
            if not got:
                continue
            rows.append({"poison": kind, "p": p, "screen": name, "seeds": len(got),
                         "recall": stats.interval({seed: s["found"] for seed, s in got}),
                         **{k: stats.mean_present(s[k] for _, s in got)
                            for k in ("benign_removed", "auroc", "length_rho")}})
    return rows


def _ranked_last(score: float | None) -> float:
    """A record without a score (no response token left to score) ranks below every scored one, as in the offline
    filter run."""
    return float("-inf") if score is None else score
