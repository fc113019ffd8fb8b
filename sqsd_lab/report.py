"""``sqsd report``: plots and a Markdown summary from a run's ``scores.jsonl``, ``drift.jsonl`` and texts."""

from __future__ import annotations

import json
from pathlib import Path

from sqsd_callback.scoring import riskiest
from sqsd_callback.sinks import read_jsonl
from sqsd_lab import plots


def find_run(path: str | Path) -> Path:
    """The directory holding ``scores.jsonl``: the path itself or its ``sqsd/`` subdirectory."""
    path = Path(path)
    for candidate in (path, path / "sqsd"):
        if (candidate / "scores.jsonl").is_file():
            return candidate
    raise FileNotFoundError(f"No scores.jsonl in {path} or {path / 'sqsd'}: point `sqsd report` at a run's "
                            f"output_dir (or its sqsd/ folder) written by SQSDCallback.")


def write_report(run: str | Path, out_dir: str | Path | None = None, top_k: int = 20,
                 extra_sections: list[str] = ()) -> Path:
    """Write ``drift.png``, ``layers.png``, ``scores.png`` and ``report.md``; returns the Markdown path."""
    run = find_run(run)
    out = Path(out_dir or run / "report")
    out.mkdir(parents=True, exist_ok=True)
    scores = read_jsonl(run / "scores.jsonl")
    drift = read_jsonl(run / "drift.jsonl") if (run / "drift.jsonl").is_file() else []
    meta = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    texts = {r["index"]: _shown(r) for r in read_jsonl(run / "examples.jsonl")} \
        if (run / "examples.jsonl").is_file() else {}
    figures = {"scores.png": plots.score_histogram(scores)}
    if drift:
        figures["drift.png"] = plots.drift_curve(drift)
        kinds = {s["key"]: s["kind"] for s in meta.get("sets", [])}
        if kinds:
            figures["layers.png"] = plots.layer_heatmap(drift, kinds)
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=120)

    lines = [f"# SQSD report: {run}", ""]
    scored = [r for r in scores if r.get("sqsd") is not None]
    lines += [f"- examples scored: {len(scored)} ({sum(r['sqsd'] is None for r in scores)} without scored tokens)",
              f"- optimizer steps: {len({r['step'] for r in scores})}",
              f"- metric: {meta.get('metric', '?')}, engine: {meta.get('engine', '?')}, direction sets: "
              + ", ".join(s["key"] for s in meta.get("sets", []))]
    if drift:
        last = drift[-1]
        lines += [f"- final drift (step {last['step']}): {last['drift']:+.4f} "
                  f"(danger {_signed(last['drift_danger']) or 'no set'}, "
                  f"safety {_signed(last['drift_safety']) or 'no set'})", "",
                  "![drift](drift.png)", ""]
        if "layers.png" in figures:
            lines += ["![per-module drift](layers.png)", ""]
    lines += ["![scores](scores.png)", "", f"## Top {top_k} riskiest examples", "",
              "| rank | index | SQSD | danger | safety | step | dropped | text |", "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(riskiest(scores, top_k), 1):
        text = texts.get(r["index"], "").replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| {i} | {r['index']} | {_signed(r['sqsd'])} | {_signed(r.get('danger'))} | "
                     f"{_signed(r.get('safety'))} | {r['step']} | {'yes' if r.get('dropped') else ''} | {text} |")
    dropped = [r for r in scores if r.get("dropped")]
    lines += ["", f"## Dropped examples: {len(dropped)}", ""]
    lines += [f"- step {r['step']}, index {r['index']}, SQSD {_signed(r['sqsd'])}" for r in dropped[:200]]
    lines += ["", *extra_sections]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _shown(example: dict) -> str:
    """An example as the tables show it: the end of its prompt (the user's turn, not the chat template's system
    prompt) and the start of its response; older runs have only the text's start."""
    if "response" not in example:
        return example["text"]
    return f"…{example['prompt'][-70:].strip()} → {example['response'][:80].strip()}"


def _signed(value: float | None) -> str:
    """A score for the tables; empty where the run has no set of that kind."""
    return "" if value is None else f"{value:+.4f}"
