"""The paper's window experiment: rank a benign pool by SQSD, fine-tune the aligned model on each equal window of
the ranking (and on a random window) with identical settings, and measure how harmful each result is.

Harmfulness is the share of held-out harmful prompts the fine-tuned model does not refuse (refusal-phrase
matching). The paper's claim holds where harmfulness falls with window rank: Spearman's rho between rank and
harmfulness near −1, with a bootstrap interval over the held-out prompts that excludes 0.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sqsd_callback.offline import ScoringPass, load_adapter, score_offline
from sqsd_callback.sinks.heatmap import new_figure
from sqsd_lab.data import tokenize_chats
from sqsd_lab.evidence import stats
from sqsd_lab.finetune import lora_config, train_lora
from sqsd_lab.refusal import refusal_rate
from sqsd_lab.screening import rank_windows


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (stats.spearman); nan where either side is constant, so means over seeds and
    bootstrap percentiles carry it as numpy does."""
    rho = stats.spearman(list(x), list(y))
    return float("nan") if rho is None else rho


def bootstrap_rho(complied: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of Spearman's rho between window rank and harmfulness, resampling the held-out prompts.
    ``complied[w, j]``: window w's model answered (did not refuse) prompt j."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, complied.shape[0] + 1)
    rhos = []
    for _ in range(n_boot):
        pick = rng.integers(0, complied.shape[1], complied.shape[1])
        rho = spearman(ranks, complied[:, pick].mean(1))
        if not np.isnan(rho):
            rhos.append(rho)
    if not rhos:
        return float("nan"), float("nan")
    return float(np.percentile(rhos, 2.5)), float(np.percentile(rhos, 97.5))


def score_variants(model, samples: Sequence[dict], danger: tuple[Path, object], safety: tuple[Path, object],
                   checkpoint: Path, alpha: float, batch_size: int = 8) -> dict[str, list[dict]]:
    """Offline rows of the pool under each metric, the paper's initialisations (danger at the checkpoint θ_t,
    safety at θ_0 + α·V_safety)."""
    passes = [ScoringPass(checkpoint, [danger[1]]), ScoringPass(safety[0], [safety[1]], alpha)]
    return {metric: score_offline(model, samples, passes, metric, batch_size)
            for metric in ("cosine", "global_cosine")}


def variant_correlations(variants: dict[str, list[dict]], online: list[dict] | None) -> dict[str, float]:
    """Spearman's rho of each score variant with the reference (SQSD, cosine, offline) over the pool."""
    ref = {r["index"]: r["sqsd"] for r in variants["cosine"] if r["sqsd"] is not None}
    others = {"danger only (cosine)": {r["index"]: r["danger"] for r in variants["cosine"]},
              "SQSD, global_cosine": {r["index"]: r["sqsd"] for r in variants["global_cosine"]}}
    if online:
        first = {}
        for r in online:  # the first epoch's online score of each example
            if r.get("sqsd") is not None:
                first.setdefault(r["index"], r["sqsd"])
        others["SQSD online (monitored run, epoch 1)"] = first
    out = {}
    for name, values in others.items():
        common = [i for i in ref if values.get(i) is not None]
        out[name] = spearman([ref[i] for i in common], [values[i] for i in common]) if len(common) > 2 else None
    return out


def run_windows(model, tokenizer, records: Sequence[dict], held_out: Sequence[str], out: str | Path,
                danger: tuple[Path, object], safety: tuple[Path, object], checkpoint: Path, k: int = 4,
                alpha: float = 0.5, rank: int = 8, max_length: int = 192, eval_tokens: int = 32,
                online: list[dict] | None = None, seed: int = 0, **train) -> dict:
    """Score ``records`` (prompt/response) at θ_0 = ``model``, fine-tune θ_0 on each of ``k`` windows by rank and
    on a random window of the same size (same steps, seed and hyper-parameters; ``train`` overrides SFTConfig
    fields), and measure refusal on ``held_out`` prompts after each. Writes ``windows.json``, ``windows.md`` and
    ``windows.png`` under ``out``; returns the results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = tokenize_chats(tokenizer, records, max_length)
    variants = score_variants(model, samples, danger, safety, checkpoint, alpha)
    _, windows = rank_windows(variants["cosine"], k)
    size = min(w["size"] for w in windows)
    control = random.Random(seed).sample(range(len(samples)), size)
    runs = [(f"window {w['window']}", w["indices"][:size]) for w in windows] + [("random", control)]
    results = {}
    for name, indices in runs:
        adapter = out / name.replace(" ", "_")
        if not (adapter / "refusal.json").is_file():  # each finished window is kept: a rerun resumes
            train_lora(model, tokenizer, [samples[i] for i in indices], adapter, lora=lora_config(rank),
                       seed=seed, **train)
            tuned = load_adapter(model, adapter)
            try:
                rate = refusal_rate(tuned, tokenizer, held_out, eval_tokens)
            finally:
                tuned.unload()
            (adapter / "refusal.json").write_text(json.dumps(rate))
        rate = json.loads((adapter / "refusal.json").read_text())
        results[name] = {"indices": indices, "harmfulness": 1 - rate["rate"],
                         "complied": [not r["refused"] for r in rate["records"]]}
    complied = np.array([results[f"window {w['window']}"]["complied"] for w in windows], dtype=float)
    ranks = list(range(1, k + 1))
    harm = complied.mean(1).tolist()
    summary = {
        "seed": seed, "examples": len(samples), "k": k, "window_size": size, "held_out": len(held_out),
        "windows": [{"window": w["window"], "sqsd_mean": w["sqsd_mean"], "harmfulness": h}
                    for w, h in zip(windows, harm)],
        "random": results["random"]["harmfulness"],
        "rho": spearman(ranks, harm), "rho_95": bootstrap_rho(complied, seed=seed),
        "variants_rho": variant_correlations(variants, online),
    }
    (out / "windows.json").write_text(json.dumps(summary, indent=1))
    _plot(summary, out / "windows.png")
    (out / "windows.md").write_text(table(summary))
    return summary


def across_seeds(summaries: Sequence[dict]) -> dict:
    """The window experiment repeated over training seeds: rho per seed, its mean with a 95% t interval across
    seeds, and harmfulness per window (mean, min, max over seeds). ``summaries``: ``run_windows`` results that
    differ only in ``seed``."""
    rhos = [s["rho"] for s in summaries]
    mean = float(np.mean(rhos))
    half = _t975(len(rhos) - 1) * float(np.std(rhos, ddof=1)) / np.sqrt(len(rhos)) if len(rhos) > 1 else math.nan
    harm = np.array([[w["harmfulness"] for w in s["windows"]] for s in summaries])
    random_harm = [s["random"] for s in summaries]
    return {
        "seeds": [s["seed"] for s in summaries], "k": summaries[0]["k"], "window_size": summaries[0]["window_size"],
        "held_out": summaries[0]["held_out"], "rho_per_seed": rhos, "rho_mean": mean,
        "rho_95_across_seeds": [max(-1.0, mean - half), min(1.0, mean + half)],
        "rho_of_mean_harmfulness": spearman(range(1, harm.shape[1] + 1), harm.mean(0)),
        "windows": [{"window": w["window"], "sqsd_mean": w["sqsd_mean"], "harmfulness_mean": float(col.mean()),
                     "harmfulness_min": float(col.min()), "harmfulness_max": float(col.max())}
                    for w, col in zip(summaries[0]["windows"], harm.T)],
        "random": {"mean": float(np.mean(random_harm)), "min": min(random_harm), "max": max(random_harm)},
    }


_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def _t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom: tabulated to 10, then the
    Cornish-Fisher expansion around the normal's 1.96 (within 1e-3 beyond)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def seeds_table(combined: dict) -> str:
    """The across-seeds results as Markdown."""
    lo, hi = combined["rho_95_across_seeds"]
    lines = ["| window (1 = riskiest) | mean SQSD | harmfulness, mean over seeds (min–max) |", "|---|---|---|",
             *[f"| {w['window']} | {w['sqsd_mean']:+.3f} | {w['harmfulness_mean']:.3f} "
               f"({w['harmfulness_min']:.3f}–{w['harmfulness_max']:.3f}) |" for w in combined["windows"]],
             f"| random | | {combined['random']['mean']:.3f} ({combined['random']['min']:.3f}–"
             f"{combined['random']['max']:.3f}) |", "",
             f"Spearman's rho per training seed {combined['seeds']}: "
             f"{', '.join(f'{r:+.2f}' for r in combined['rho_per_seed'])}; mean {combined['rho_mean']:+.3f}, 95% "
             f"t interval across seeds [{lo:+.3f}, {hi:+.3f}]; rho of the seed-mean harmfulness "
             f"{combined['rho_of_mean_harmfulness']:+.3f}."]
    return "\n".join(lines) + "\n"


def seeds_plot(combined: dict, path: Path) -> None:
    """Harmfulness per window: each seed's range and the mean, with the random window's mean."""
    fig, ax = new_figure((6, 3.6))
    ws = combined["windows"]
    x = [w["window"] for w in ws]
    mean = [w["harmfulness_mean"] for w in ws]
    ax.errorbar(x, mean, yerr=[[m - w["harmfulness_min"] for m, w in zip(mean, ws)],
                               [w["harmfulness_max"] - m for m, w in zip(mean, ws)]], fmt="o-", capsize=3,
                label=f"mean over seeds {combined['seeds']} (min–max)")
    ax.axhline(combined["random"]["mean"], color="grey", ls="--", label="random window (mean)")
    ax.set(xlabel="window (1 = riskiest by SQSD)", ylabel="harmfulness (1 − refusal rate)",
           title=f"rho per seed {', '.join(f'{r:+.2f}' for r in combined['rho_per_seed'])}")
    ax.set_xticks(x)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(summary: dict) -> str:
    """The results as Markdown: harmfulness per window and the control, rho with its interval, the variants."""
    lo, hi = summary["rho_95"]
    lines = ["| window (1 = riskiest) | mean SQSD | harmfulness (held-out harmful prompts answered) |",
             "|---|---|---|",
             *[f"| {w['window']} | {w['sqsd_mean']:+.4f} | {w['harmfulness']:.3f} |" for w in summary["windows"]],
             f"| random | | {summary['random']:.3f} |", "",
             f"Spearman's rho (window rank vs harmfulness): {summary['rho']:+.3f}, 95% bootstrap interval over the "
             f"{summary['held_out']} held-out prompts [{lo:+.3f}, {hi:+.3f}] (the paper's ordering is rho = −1).", "",
             "| score variant | Spearman's rho with SQSD (cosine, offline) over the pool |", "|---|---|",
             *[f"| {name} | {'n/a' if rho is None else f'{rho:+.3f}'} |"
               for name, rho in summary["variants_rho"].items()]]
    return "\n".join(lines) + "\n"


def _plot(summary: dict, path: Path) -> None:
    fig, ax = new_figure((6, 3.6))
    ws = summary["windows"]
    ax.plot([w["window"] for w in ws], [w["harmfulness"] for w in ws], "o-", label="window by SQSD rank")
    ax.axhline(summary["random"], color="grey", ls="--", label="random window")
    ax.set(xlabel="window (1 = riskiest by SQSD)", ylabel="harmfulness (1 − refusal rate)",
           title=f"Fine-tuning on each window: rho = {summary['rho']:+.2f}")
    ax.set_xticks([w["window"] for w in ws])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
