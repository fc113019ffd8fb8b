"""``sqsd score``'s inputs and outputs: the examples as it scores them, the settings its part files are tied to, the
ranking by SQSD, equal-width windows of it, a plot of the scores, and the files that hold them."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from matplotlib.figure import Figure

from sqsd_callback.sinks.heatmap import new_figure
from sqsd_lab.data import chat_samples

_TEXT_CHARS = 200
SETTINGS = "settings.json"
"""The file in the part-files folder that records the settings its rows were scored with."""


class ChatSamples:
    """A dataset's examples as ``sqsd score`` scores them, tokenised as the records are read, again on each
    iteration; prompts too long for ``max_length`` are left out. Each sample's ``extra`` holds its prompt's first
    characters and the data's own columns, which the outputs carry."""

    def __init__(self, records: Iterable[dict], tokenizer, max_length: int) -> None:
        self.records, self.tokenizer, self.max_length = records, tokenizer, max_length

    def __iter__(self) -> Iterator[dict]:
        for record, sample in chat_samples(self.tokenizer, self.records, self.max_length, skip_long=True):
            yield {**sample, "extra": {"prompt": record["prompt"][:_TEXT_CHARS], "columns": record["columns"]}}


def claim_parts(folder: Path, settings: dict) -> str | None:
    """Tie the part files in ``folder`` to the settings that score them: recorded while the folder holds no row yet;
    None where the recorded settings are these, else a refusal naming each change and how to start afresh."""
    path, settings = folder / SETTINGS, json.loads(json.dumps(settings))
    if path.is_file() and any(f.stat().st_size for f in folder.glob("pass*-rank*.jsonl")):
        changes = _changes(json.loads(path.read_text()), settings)
        return None if not changes else (
            f"{folder} holds the rows of a run with other settings: {'; '.join(changes)}. Run it with its own "
            f"settings to resume it, or start afresh with --fresh (which deletes {folder}) or another --out.")
    folder.mkdir(parents=True, exist_ok=True)
    with _replacing(path) as tmp:
        tmp.write_text(json.dumps(settings, indent=1))
    return None


def _changes(before: dict, now: dict) -> list[str]:
    """What differs between two settings records, one phrase per setting (per path for ``files``)."""
    changes = []
    for key in dict.fromkeys([*before, *now]):
        was, is_ = before.get(key), now.get(key)
        if key == "files" and isinstance(was, dict) and isinstance(is_, dict):
            changes += [f"the files of {path} changed" for path in dict.fromkeys([*was, *is_])
                        if was.get(path) != is_.get(path)]
        elif was != is_:
            changes.append(f"{key} was {was!r}, now {is_!r}")
    return changes


def file_stamps(path: str | Path) -> dict[str, list[int]] | None:
    """A local file's, or a folder's files', sizes and modification times by name (None for a hub name)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else None
    return None if files is None else {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


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


def windows_within(rows: Sequence[dict], k: int, strata: Sequence[str]) -> list[dict]:
    """k windows ranked within strata: each stratum's scored rows (``strata[index]`` labels the example at
    ``index``) are cut into k windows of its own SQSD ranking (rank_windows), each cut to the stratum's smallest
    window, and window w joins every stratum's w-th. So every window holds the same number of examples of each
    stratum, and a trend across windows cannot come from a shift in the mix (window 1 the riskiest)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["sqsd"] is not None:
            groups.setdefault(strata[r["index"]], []).append(r)
    short = {label: len(g) for label, g in groups.items() if len(g) < k}
    if short:
        raise ValueError(f"strata {short} have fewer scored examples than the {k} windows: use fewer windows or "
                         "merge those strata")
    parts = {label: rank_windows(g, k)[1] for label, g in sorted(groups.items())}
    scores = {r["index"]: r["sqsd"] for r in rows}
    windows = []
    for w in range(k):
        cut = {label: ws[w]["indices"][:len(groups[label]) // k] for label, ws in parts.items()}
        indices = [i for part in cut.values() for i in part]
        values = [scores[i] for i in indices]
        windows.append({"window": w + 1, "size": len(indices), "sqsd_max": max(values), "sqsd_min": min(values),
                        "sqsd_mean": sum(values) / len(values), "indices": indices,
                        "strata": {label: len(part) for label, part in cut.items()}})
    return windows


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


def write_scores(rows: Sequence[dict], out: str | Path, k: int, about: dict) -> dict:
    """Write ``scores.jsonl``, ``ranking.csv``, ``windows.json``, ``windows.csv``, ``scores.png`` and ``score.json``
    (what was done) from score rows that carry their ``prompt`` and the data's own ``columns`` (ChatSamples'
    ``extra``), each file replaced whole; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flat = [_with_columns(r) for r in rows]
    ranking, windows = rank_windows(flat, k)
    paths = {name: out / name for name in ("scores.jsonl", "ranking.csv", "windows.json", "windows.csv",
                                           "scores.png", "score.json")}
    with _replacing(paths["scores.jsonl"]) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in flat)
    set_keys = [k_ for k_ in rows[0] if "/" in k_]
    data_keys = [k_ for k_ in flat[0] if k_ not in rows[0]]
    _write_csv(paths["ranking.csv"], ranking,
               ["rank", "window", "index", "sqsd", "danger", "safety", *set_keys, *data_keys, "prompt"])
    with _replacing(paths["windows.json"]) as tmp:
        tmp.write_text(json.dumps(windows, indent=1))
    _write_csv(paths["windows.csv"], windows, ["window", "first_rank", "last_rank", "size", "sqsd_max", "sqsd_min",
                                               "sqsd_mean"])
    with _replacing(paths["scores.png"]) as tmp:
        score_distribution(rows, windows).savefig(tmp, dpi=120)
    with _replacing(paths["score.json"]) as tmp:
        tmp.write_text(json.dumps({**about, "examples": len(rows), "scored": len(ranking), "windows": k}, indent=2))
    return paths


def _with_columns(row: dict) -> dict:
    """A score row with the data's own columns beside its scores and prompt (ids, categories; prefixed ``data_``
    where a name is taken, ``rank`` and ``window`` included)."""
    own = {k: v for k, v in row.items() if k != "columns"}
    taken = {*own, "columns", "rank", "window"}
    return {**own, **{(f"data_{k}" if k in taken else k): v for k, v in row.get("columns", {}).items()}}


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it once written: a reader sees the old file or the new one,
    never part of one."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    yield tmp
    os.replace(tmp, path)


def _write_csv(path: Path, rows: Sequence[dict], columns: list[str]) -> None:
    with _replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
