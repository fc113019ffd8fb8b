"""Figures of a run for ``sqsd report`` and the experiments: each function takes rows, returns a Figure (the
per-module heatmap and the figure helper are the library's, which its wandb sink draws)."""

from __future__ import annotations

import math
from collections import defaultdict

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sqsd_callback.sinks.heatmap import layer_heatmap, new_figure


def drift_curve(drift_rows: list[dict]) -> Figure:
    """Run-level drift per optimizer step: toward danger, toward safety, and their difference."""
    fig, ax = new_figure((7, 3.6))
    steps = [r["step"] for r in drift_rows]
    for key, style in (("drift", "-"), ("drift_danger", "--"), ("drift_safety", ":")):
        if any(r.get(key) is None for r in drift_rows):  # no set of that kind
            continue
        ax.plot(steps, [r[key] for r in drift_rows], style, label=key.replace("_", " "))
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="optimizer step", ylabel="cosine of θ_t − θ_0 with directions", title="Cumulative drift")
    ax.legend(loc="best", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def score_histogram(score_rows: list[dict]) -> Figure:
    """Distribution of per-example SQSD, one histogram per epoch."""
    by_epoch = defaultdict(list)
    for r in score_rows:
        if r.get("sqsd") is not None:
            by_epoch[max(1, math.ceil(r.get("epoch") or 1))].append(r["sqsd"])
    fig, ax = new_figure((7, 3.6))
    values = [v for vs in by_epoch.values() for v in vs]
    bins = 40 if values else 1
    span = (min(values), max(values)) if values else (0, 1)
    for epoch in sorted(by_epoch):
        ax.hist(by_epoch[epoch], bins=bins, range=span, alpha=0.55, label=f"epoch {epoch}")
    ax.set(xlabel="SQSD (higher = riskier)", ylabel="examples", title="Per-example SQSD")
    if by_epoch:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


__all__ = ["drift_curve", "layer_heatmap", "new_figure", "score_histogram"]
