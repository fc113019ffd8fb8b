"""``sqsd score``'s outputs: the ranking by SQSD, equal-width windows of it, a plot of the scores, and the files
that hold them."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from sqsd_callback.sinks.heatmap import new_figure

_TEXT_CHARS = 200


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
