"""The paper's window experiment: rank a benign pool by SQSD, fine-tune the aligned model on each equal window of
the ranking (and on a random window) with identical settings, and measure how harmful each result is.

Each fine-tuned model's answers to held-out harmful prompts are judged by the evidence judges (the phrase judge's
three-way outcome; the likelihood judge, which never reads the answer, by verdict and by margin). The paper's claim
holds where harm falls with window rank: Spearman's ρ between rank and harm near −1, with an interval that excludes
0. Ranked within strata (the records' kinds), every window has the same mix, so a trend cannot come from one.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from sqsd_callback.offline import ScoringPass, load_adapter, score_offline
from sqsd_callback.sinks.heatmap import new_figure
from sqsd_lab.data import tokenize_chats
from sqsd_lab.evidence import judges, stats
from sqsd_lab.evidence.files import write_atomic
from sqsd_lab.evidence.report import error_bars, shown_interval, shown_rho
from sqsd_lab.finetune import lora_config, train_lora
from sqsd_lab.screening import rank_windows, windows_within


def bootstrap_rho(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """95% interval of Spearman's ρ between window rank and a measure, resampling the held-out prompts (None where
    no resample has a defined ρ: the measure is the same in every window). ``values[w, j]``: the measure for window
    w's model on prompt j (``measures``)."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, values.shape[0] + 1)
    rhos = []
    for _ in range(n_boot):
        pick = rng.integers(0, values.shape[1], values.shape[1])
        rho = stats.spearman(ranks, values[:, pick].mean(1))
        if rho is not None:
            rhos.append(rho)
    if not rhos:
        return None
    return float(np.percentile(rhos, 2.5)), float(np.percentile(rhos, 97.5))


def score_variants(model, samples: Sequence[dict], danger: tuple[Path, object], safety: tuple[Path, object],
                   checkpoint: Path, alpha: float, batch_size: int = 8) -> dict[str, list[dict]]:
    """Offline rows of the pool under each metric, the paper's initialisations (danger at the checkpoint θ_t,
    safety at θ_0 + α·V_safety)."""
    passes = [ScoringPass(checkpoint, [danger[1]]), ScoringPass(safety[0], [safety[1]], alpha)]
    return {metric: score_offline(model, samples, passes, metric, batch_size)
            for metric in ("cosine", "global_cosine")}


def variant_correlations(variants: dict[str, list[dict]], online: list[dict] | None) -> dict[str, float | None]:
    """Spearman's rho of each score variant with the reference (SQSD, cosine, offline) over the pool (None where it
    is undefined: fewer than 3 scored records, or a constant side)."""
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
        out[name] = stats.spearman([ref[i] for i in common], [values[i] for i in common]) if len(common) > 2 else None
    return out


def measures(evaluation: dict) -> dict[str, list[float]]:
    """Per-prompt values of one evaluation (``judges.judge_generations``): each judge's harmful indicator under its
    name, each judge's own score where it has one under ``<judge> score`` (the likelihood judge's margin, which
    sees a shift its 0 threshold does not), and ``phrase, not refused``: 1 − the refusal rate, the measure of the
    earlier window experiments, which counts degenerate answers as harmful. Higher is more harmful for each."""
    out = {j: judges.harmful(o) for j, o in evaluation["outcomes"].items()}
    out.update({f"{j} score": list(v) for j, v in evaluation["scores"].items()})
    if "phrase" in evaluation["outcomes"]:
        out["phrase, not refused"] = [float(o != "refusal") for o in evaluation["outcomes"]["phrase"]]
    return out


def _mix(indices: Sequence[int], strata: Sequence[str] | None) -> dict[str, int] | None:
    """How many examples of each stratum ``indices`` hold (None without strata)."""
    return None if strata is None else dict(sorted(Counter(strata[i] for i in indices).items()))


def run_windows(model, tokenizer, records: Sequence[dict], held_out: Sequence[str], out: str | Path,
                danger: tuple[Path, object], safety: tuple[Path, object], checkpoint: Path, k: int = 4,
                alpha: float = 0.5, rank: int = 8, max_length: int = 192, eval_tokens: int = 32,
                online: list[dict] | None = None, seed: int = 0, strata: Sequence[str] | None = None,
                within: bool = False, variants: dict[str, list[dict]] | None = None, **train) -> dict:
    """Score ``records`` (prompt/response) at θ_0 = ``model``, fine-tune θ_0 on each of ``k`` windows by rank and
    on a random window of the same size (same steps, seed and hyper-parameters; ``train`` overrides SFTConfig
    fields), and judge the answers to ``held_out`` prompts after each (``judges.judge_generations``: the phrase
    judge's three-way outcome and the likelihood judge). ``strata``: a label per record (its kind) whose mix each
    window reports; ``within``: rank within those strata (``screening.windows_within``), so every window has the
    same mix. ``variants``: ``score_variants``' rows where the caller has them (they depend on neither the seed nor
    the ranking). Each window's adapter and judged answers are kept under ``out`` with what made them, and reused
    by a rerun that would make them alike. Writes ``windows.json``, ``windows.md`` and ``windows.png`` under
    ``out``; returns the results."""
    if strata is not None and len(strata) != len(records):
        raise ValueError(f"strata has {len(strata)} labels for {len(records)} records: give one label per record")
    if within and strata is None:
        raise ValueError("within=True ranks within strata: give strata, one label per record (e.g. its category)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = tokenize_chats(tokenizer, records, max_length)
    if variants is None:
        variants = score_variants(model, samples, danger, safety, checkpoint, alpha)
    windows = windows_within(variants["cosine"], k, strata) if within else rank_windows(variants["cosine"], k)[1]
    size = min(w["size"] for w in windows)
    control = random.Random(seed).sample(range(len(samples)), size)
    runs = [(f"window {w['window']}", w["indices"][:size]) for w in windows] + [("random", control)]
    evaluations = {}
    for name, indices in runs:
        adapter = out / name.replace(" ", "_")
        made = {"indices": list(indices), "seed": seed, "rank": rank, "max_length": max_length, "train": train,
                "held_out": list(held_out), "eval_tokens": eval_tokens}

        def make(adapter: Path = adapter, indices: list[int] = indices) -> dict:
            train_lora(model, tokenizer, [samples[i] for i in indices], adapter, lora=lora_config(rank),
                       seed=seed, **train)
            tuned = load_adapter(model, adapter)
            try:
                return judges.judge_generations(tuned, tokenizer, held_out, held_out, eval_tokens)
            finally:
                tuned.unload()

        evaluation = _kept(adapter / "judged.json", made, make)
        evaluations[name] = {"indices": indices, "outcomes": evaluation["outcomes"], "scores": evaluation["scores"]}
    names = [name for name, _ in runs[:-1]]
    values = {name: measures(e) for name, e in evaluations.items()}
    ranks = list(range(1, k + 1))
    summary = {
        "seed": seed, "examples": len(samples), "k": k, "window_size": size, "held_out": len(held_out),
        "ranking": "within strata" if within else "overall",
        "windows": [{"window": w["window"], "sqsd_mean": w["sqsd_mean"], "mix": _mix(evaluations[n]["indices"], strata),
                     **_levels(evaluations[n])} for w, n in zip(windows, names)],
        "random": {"mix": _mix(control, strata), **_levels(evaluations["random"])},
        # ρ is undefined (None) for a measure that is the same in every window
        "rho": {m: stats.spearman(ranks, [float(np.mean(values[n][m])) for n in names]) for m in values["random"]},
        "rho_95": {m: bootstrap_rho(np.array([values[n][m] for n in names]), seed=seed) for m in values["random"]},
        "variants_rho": variant_correlations(variants, online),
        "evaluations": evaluations,
    }
    (out / "windows.json").write_text(json.dumps(summary, indent=1))
    combined = across_seeds([summary])
    seeds_plot(combined, out / "windows.png")
    (out / "windows.md").write_text(seeds_table(combined))
    return summary


def _kept(path: Path, made: dict, make: Callable[[], dict]) -> dict:
    """The evaluation saved at ``path`` where ``made`` (what made it) is unchanged, else ``make()``'s, saved with
    ``made``: a finished window is kept, and a rerun resumes."""
    saved = json.loads(path.read_text()) if path.is_file() else None
    if saved is None or saved.get("made") != made:
        saved = {**make(), "made": made}
        write_atomic(path, saved)
    return saved


def reference(model, tokenizer, held_out: Sequence[str], out: str | Path, eval_tokens: int = 32) -> dict:
    """θ_0's answers to ``held_out`` judged as each window's are (kept under ``out``): the level fine-tuning on
    any window moves from. Its measures' means, degenerate share and the evaluation."""
    evaluation = _kept(Path(out) / "judged.json", {"held_out": list(held_out), "eval_tokens": eval_tokens},
                       lambda: judges.judge_generations(model, tokenizer, held_out, held_out, eval_tokens))
    return {**_levels(evaluation), "evaluation": {"outcomes": evaluation["outcomes"], "scores": evaluation["scores"]}}


def _levels(evaluation: dict) -> dict:
    """One evaluation's phrase-judged degenerate share and each measure's mean over its prompts."""
    phrase = evaluation["outcomes"]["phrase"]
    return {"degenerate": phrase.count("degenerate") / len(phrase),
            "measures": {m: float(np.mean(v)) for m, v in measures(evaluation).items()}}


def across_seeds(summaries: Sequence[dict]) -> dict:
    """The window experiment repeated over training seeds (``run_windows`` results that differ only in ``seed``):
    per measure (``measures``), ρ per seed with its mean and 95 % t interval across seeds, and each window's mean
    with a two-level bootstrap interval over seeds and held-out prompts (``stats.interval``)."""
    first = summaries[0]
    names = [f"window {w['window']}" for w in first["windows"]] + ["random"]
    values = {n: {s["seed"]: measures(s["evaluations"][n]) for s in summaries} for n in names}
    by_measure = {}
    for m in first["rho"]:
        cells = [stats.interval({seed: v[m] for seed, v in values[n].items()}) for n in names]
        rhos = [s["rho"][m] for s in summaries]
        mean = half = None  # where a seed's ρ is undefined, so are their mean and its interval
        if all(r is not None for r in rhos):
            mean = float(np.mean(rhos))
            if len(rhos) > 1:
                half = _t975(len(rhos) - 1) * float(np.std(rhos, ddof=1)) / np.sqrt(len(rhos))
        by_measure[m] = {"rho_per_seed": rhos, "rho_mean": mean,
                         "rho_95_across_seeds": None if half is None else [max(-1.0, mean - half),
                                                                           min(1.0, mean + half)],
                         "rho_of_mean": stats.spearman(range(1, len(names)), [c["mean"] for c in cells[:-1]]),
                         "windows": cells[:-1], "random": cells[-1]}
    degenerate = [[s["windows"][i]["degenerate"] for s in summaries] for i in range(len(first["windows"]))]
    return {"seeds": [s["seed"] for s in summaries], "k": first["k"], "window_size": first["window_size"],
            "held_out": first["held_out"], "ranking": first["ranking"],
            "windows": [{"window": w["window"], "sqsd_mean": w["sqsd_mean"], "mix": w["mix"],
                         "degenerate": float(np.mean(d))} for w, d in zip(first["windows"], degenerate)],
            "random": {"mix": first["random"]["mix"],
                       "degenerate": float(np.mean([s["random"]["degenerate"] for s in summaries]))},
            "measures": by_measure}


_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def _t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom: tabulated to 10, then the
    Cornish-Fisher expansion around the normal's 1.96 (within 1e-3 beyond)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _mix_cell(mix: dict[str, int] | None) -> str:
    """A window's mix of strata, e.g. ``task 12, writing 13`` (a dash without strata)."""
    return "–" if not mix else ", ".join(f"{label} {n}" for label, n in mix.items())


def seeds_table(combined: dict, theta_0: dict | None = None) -> str:
    """``across_seeds`` results as Markdown: per window its mean SQSD, mix, each measure with its interval and the
    degenerate share, θ_0's row (``reference``) where given; then ρ per seed, its mean and interval, per measure."""
    ms = list(combined["measures"])
    head = ["window (1 = riskiest)", "mean SQSD", "mix", *ms, "degenerate (phrase)"]
    lines = [f"Ranking: {combined['ranking']}; {combined['window_size']} examples per window; training seeds "
             f"{combined['seeds']}; {combined['held_out']} held-out harmful prompts. Each measure: mean over seeds "
             "[95 % bootstrap interval over seeds and prompts]; higher is more harmful.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, w in enumerate(combined["windows"]):
        cells = [str(w["window"]), f"{w['sqsd_mean']:+.3f}", _mix_cell(w["mix"]),
                 *(shown_interval(combined["measures"][m]["windows"][i]) for m in ms), f"{w['degenerate']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    r = combined["random"]
    lines += ["| " + " | ".join(["random", "", _mix_cell(r["mix"]),
                                 *(shown_interval(combined["measures"][m]["random"]) for m in ms),
                                 f"{r['degenerate']:.2f}"]) + " |"]
    if theta_0 is not None:
        lines.append("| " + " | ".join(["θ_0 (no fine-tuning)", "", "–",
                                         *(f"{theta_0['measures'][m]:.2f}" for m in ms),
                                         f"{theta_0['degenerate']:.2f}"]) + " |")
    lines.append("")
    for m in ms:
        x = combined["measures"][m]
        spread = "" if x["rho_95_across_seeds"] is None else (
            ", 95 % t interval across seeds [{:+.2f}, {:+.2f}]".format(*x["rho_95_across_seeds"]))
        lines.append(f"- {m}: Spearman's ρ (window rank vs the measure) per seed "
                     f"{', '.join(shown_rho(r) for r in x['rho_per_seed'])}; mean {shown_rho(x['rho_mean'])}{spread}; "
                     f"ρ of the seed means {shown_rho(x['rho_of_mean'])} (the paper's ordering is ρ = −1).")
    return "\n".join(lines) + "\n"


def seeds_plot(combined: dict, path: Path, theta_0: dict | None = None) -> None:
    """Each measure per window with its interval, the random window's mean and θ_0's (``reference``) where given,
    one panel per measure."""
    ms = list(combined["measures"])
    fig, axes = new_figure((3.4 * len(ms), 3.4), ncols=len(ms))
    x = [w["window"] for w in combined["windows"]]
    for ax, m in zip(np.atleast_1d(axes), ms):
        cells = combined["measures"][m]["windows"]
        mean = [c["mean"] for c in cells]
        ax.errorbar(x, mean, yerr=error_bars(cells), fmt="o-", capsize=3, label="window by SQSD rank")
        ax.axhline(combined["measures"][m]["random"]["mean"], color="grey", ls="--", label="random window")
        if theta_0 is not None:
            ax.axhline(theta_0["measures"][m], color="black", ls=":", label="θ_0 (no fine-tuning)")
        ax.set(xlabel="window (1 = riskiest by SQSD)", ylabel=m, title=f"{m}: mean ρ "
               f"{shown_rho(combined['measures'][m]['rho_mean'])}")
        ax.set_xticks(x)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(f"{combined['ranking']} ranking, seeds {combined['seeds']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
