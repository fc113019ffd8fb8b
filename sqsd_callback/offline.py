"""``sqsd score``: offline SQSD of a dataset the paper's way, its ranking, equal-width windows by rank and a plot.

The paper (DESIGN §1) takes danger projections at a fine-tuning checkpoint θ_t (a LoRA adapter at its own scaling)
and safety projections at θ_0 + α·V_safety (the safety adapter with its scaling replaced by α). Each pass loads one
adapter onto the base model, scores the sets it serves with ``score_samples`` and takes the adapter off again.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from .directions import DirectionSet
from .finetune import load_adapter
from .plots import new_figure
from .scoring import combine, score_samples

_TEXT_CHARS = 200


@dataclass
class ScoringPass:
    """Score ``sets`` at base + ``adapter`` (its own scaling, or ``scaling`` in its place); with no adapter, at
    the model's own parameters (its Linear weights are then the scored targets, as in full fine-tuning)."""

    adapter: str | Path | None
    sets: list[DirectionSet]
    scaling: float | None = None

    def describe(self) -> dict:
        return {"adapter": None if self.adapter is None else str(self.adapter),
                "scaling": self.scaling or "adapter's own", "sets": [f"{s.kind}/{s.name}" for s in self.sets]}


def paper_passes(danger: Sequence[tuple[str | Path, DirectionSet]], safety: Sequence[tuple[str | Path, DirectionSet]],
                 checkpoint: str | Path | None = None, alpha: float = 0.5) -> list[ScoringPass]:
    """The paper's initialisations for (adapter, set) pairs: danger sets at the checkpoint θ_t (without one, each at
    θ_0 + α·its own adapter), safety sets each at θ_0 + α·its own adapter."""
    passes = [ScoringPass(checkpoint, [s for _, s in danger])] if checkpoint is not None and danger else \
        [ScoringPass(path, [s], alpha) for path, s in danger]
    return passes + [ScoringPass(path, [s], alpha) for path, s in safety]


def score_offline(model, samples: Sequence[dict], passes: Sequence[ScoringPass], metric: str = "cosine",
                  batch_size: int = 8, max_tokens: int | None = None) -> list[dict]:
    """One row per sample: every set's projection at its pass's parameters, the per-kind means and SQSD (None for a
    sample without scored tokens); ``model`` (the base, θ_0) is left as found."""
    keys = [f"{s.kind}/{s.name}" for p in passes for s in p.sets]
    kinds = {f"{s.kind}/{s.name}": s.kind for p in passes for s in p.sets}
    if len(kinds) != len(keys):
        raise ValueError(f"direction set names must be unique per kind (name them with NAME=ADAPTER); got {keys}")
    values: list[dict] = [{} for _ in samples]
    for p in passes:
        scored = model if p.adapter is None else load_adapter(model, p.adapter, p.scaling)
        try:
            rows = score_samples(scored, samples, danger=[s for s in p.sets if s.kind == "danger"],
                                 safety=[s for s in p.sets if s.kind == "safety"], metric=metric, engine="hooks",
                                 batch_size=batch_size, max_tokens=max_tokens)
        finally:
            if scored is not model:
                scored.unload()
        for value, row in zip(values, rows):
            value.update({f"{s.kind}/{s.name}": row[f"{s.kind}/{s.name}"] for s in p.sets})
    out = []
    for sample, value in zip(samples, values):
        row = {"index": sample.get("index"), "danger": None, "safety": None, "sqsd": None}
        if all(v is not None for v in value.values()):
            row.update(combine(list(value.values()), [kinds[k] for k in value]))
        out.append({**row, **value})
    return out


def rank_windows(rows: Sequence[dict], k: int) -> tuple[list[dict], list[dict]]:
    """(ranking, windows): scored rows by SQSD, riskiest first, each with its ``rank`` and ``window``; and k
    contiguous windows of the ranking whose sizes differ by at most one (window 1 the riskiest)."""
    ranked = sorted((r for r in rows if r["sqsd"] is not None), key=lambda r: r["sqsd"], reverse=True)
    if not ranked:
        raise ValueError("no example has scored tokens (every label is -100): nothing to rank")
    if not 1 <= k <= len(ranked):
        raise ValueError(f"windows must be between 1 and the {len(ranked)} scored examples, not {k}")
    ranking, windows, start = [], [], 0
    for w in range(k):
        size = len(ranked) // k + (w < len(ranked) % k)
        chunk = ranked[start:start + size]
        ranking += [{"rank": start + i + 1, "window": w + 1, **r} for i, r in enumerate(chunk)]
        values = [r["sqsd"] for r in chunk]
        windows.append({"window": w + 1, "first_rank": start + 1, "last_rank": start + size, "size": size,
                        "sqsd_max": values[0], "sqsd_min": values[-1], "sqsd_mean": sum(values) / size,
                        "indices": [r["index"] for r in chunk]})
        start += size
    return ranking, windows


def score_distribution(rows: Sequence[dict], windows: Sequence[dict]) -> Figure:
    """Histogram of per-example SQSD with the window boundaries, and danger against safety projections."""
    scored = [r for r in rows if r["sqsd"] is not None]
    fig, (left, right) = new_figure((11, 3.8), ncols=2)
    left.hist([r["sqsd"] for r in scored], bins=min(50, max(10, len(scored) // 4)), color="tab:red", alpha=0.7)
    for w in windows[1:]:
        left.axvline(w["sqsd_max"], color="grey", lw=0.8, ls="--")
    left.set(xlabel="SQSD (higher = riskier)", ylabel="examples",
             title=f"Per-example SQSD, {len(windows)} windows by rank")
    right.scatter([r["safety"] or 0.0 for r in scored], [r["danger"] or 0.0 for r in scored], s=8, alpha=0.6,
                  c=[r["sqsd"] for r in scored], cmap="coolwarm")
    right.set(xlabel="P(safety)", ylabel="P(danger)", title="Danger against safety projection")
    fig.tight_layout()
    return fig


def write_scores(rows: Sequence[dict], records: Sequence[dict], out: str | Path, k: int, about: dict) -> dict:
    """Write ``scores.jsonl``, ``ranking.csv``, ``windows.json``, ``windows.csv``, ``scores.png`` and ``score.json``
    (what was done); returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ranking, windows = rank_windows(rows, k)
    paths = {name: out / name for name in ("scores.jsonl", "ranking.csv", "windows.json", "windows.csv",
                                           "scores.png", "score.json")}

    def text(r: dict) -> dict:
        """The example's prompt and the data's own columns (ids, categories; prefixed ``data_`` on a clash)."""
        record = records[r["index"]]
        columns = {(f"data_{k}" if k in r or k == "prompt" else k): v for k, v in record.get("columns", {}).items()}
        return {"prompt": record["prompt"][:_TEXT_CHARS], **columns}

    with open(paths["scores.jsonl"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps({**r, **text(r)}) + "\n" for r in rows)
    set_keys = [k_ for k_ in rows[0] if "/" in k_]
    data_keys = list(dict.fromkeys(k_ for r in rows[:1] for k_ in text(r) if k_ != "prompt"))
    _write_csv(paths["ranking.csv"], [{**r, **text(r)} for r in ranking],
               ["rank", "window", "index", "sqsd", "danger", "safety", *set_keys, *data_keys, "prompt"])
    paths["windows.json"].write_text(json.dumps(windows, indent=1))
    _write_csv(paths["windows.csv"], windows, ["window", "first_rank", "last_rank", "size", "sqsd_max", "sqsd_min",
                                               "sqsd_mean"])
    fig = score_distribution(rows, windows)
    fig.savefig(paths["scores.png"], dpi=120)
    paths["score.json"].write_text(json.dumps({**about, "examples": len(rows), "scored": len(ranking),
                                               "windows": k}, indent=2))
    return paths


def _write_csv(path: Path, rows: Sequence[dict], columns: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
