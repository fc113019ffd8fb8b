"""The evidence summary (``protocol.summarize``) as people read it: a Markdown table per poison kind and share, and a
figure of harmfulness by judge with its interval beside the held-out loss, one row per condition."""

from __future__ import annotations

from matplotlib.figure import Figure


def shown_interval(i: dict | None, digits: int = 2) -> str:
    """``mean [low, high]`` of a summary interval, or a dash."""
    if i is None:
        return "–"
    return f"{i['mean']:.{digits}f} [{i['ci_low']:.{digits}f}, {i['ci_high']:.{digits}f}]"


def shown_rho(x: float | None) -> str:
    """A rank correlation for a table: ``+0.50``, or ``n/a`` where it is undefined (a constant side)."""
    return "n/a" if x is None else f"{x:+.2f}"


def _number(x: float | None, fmt: str = ".2f") -> str:
    """A number, or a dash for None."""
    return "–" if x is None else format(x, fmt)


def _equivalence(row: dict, judge: str) -> str:
    """The paired difference against clean and the TOST verdict, e.g. ``+0.03 [-0.02, +0.08] yes``."""
    e = row["equivalent_to_clean"].get(judge)
    if e is None or e["equivalent"] is None:
        return _verdict(e)
    return f"{_signed_interval(e['difference'])} {_verdict(e)}"


def _verdict(e: dict | None) -> str:
    """A TOST verdict (protocol._equivalence) in a word: yes, no, no verdict (the judge never fired) or a dash."""
    if e is None:
        return "–"
    return "no verdict: never harmful" if e["equivalent"] is None else ("yes" if e["equivalent"] else "no")


def judges_of(summary: dict) -> list[str]:
    """The judges every row was judged by, the phrase judge first."""
    names = set.intersection(*(set(r["harmfulness"]) for r in summary["rows"])) if summary["rows"] else set()
    return sorted(names, key=lambda n: (n != "phrase", n))


def table(summary: dict) -> str:
    """Markdown: per (poison, p) a table of every condition's harmfulness by judge (95 % interval over seeds and
    prompts), each judge's own score where every row has one (the likelihood margin: higher = nearer compliance),
    degenerate share, the paired difference to clean with its ±margin equivalence verdict, over-refusal,
    held-out loss, task accuracy, recall, benign removed and the ranking's Spearman ρ with response length, the
    monitor's own ranking at the filters' budget (its recall, benign removed and ρ with length); recall by
    response-length third of each removal and ranking; what the online ranking follows (its terms and length alone);
    harmfulness under the poison's persona prompt; the pools' screening before training; then the judges'
    agreement."""
    judges = judges_of(summary)
    scored = [j for j in judges if all(j in r.get("judge_score", {}) for r in summary["rows"])]
    head = ["condition", "seeds", *(f"harmful ({j})" for j in judges), *(f"{j} score" for j in scored),
            "degenerate (phrase)",
            *(f"vs clean ({j}), equivalent?" for j in judges), "over-refusal", "held-out loss", "accuracy",
            "recall", "benign removed", "ρ with length", "SQSD top-k recall", "its benign removed",
            "its ρ with length"]
    blocks, groups = [], {}
    for row in summary["rows"]:
        groups.setdefault((row["poison"], row["p"]), []).append(row)
    for (kind, p), rows in groups.items():
        title = "no poison" if kind == "none" else f"{kind}, p = {p:g}"
        lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["condition"], str(r["seeds"]), *(shown_interval(r["harmfulness"].get(j)) for j in judges),
                     *(f"{shown_interval(r['judge_score'][j])}{_shift(r, j)}" for j in scored),
                     shown_interval(r.get("degenerate", {}).get("phrase")), *(_equivalence(r, j) for j in judges),
                     shown_interval(r["over_refusal"]), _number(r["heldout_loss"], ".3f"),
                     shown_interval(r["accuracy"]), _number(r["recall"]), _number(r["benign_removed"]),
                     _number(r["length_rho"]), *(_number(r.get(f"ranking_{k}"))
                                                 for k in ("recall", "benign_removed", "length_rho"))]
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    strata = [(r, which) for r in summary["rows"] for which in ("removal", "ranking")
              if (r.get("by_length") or {}).get(which)]
    if strata:
        n = len(strata[0][0]["by_length"][strata[0][1]])
        lines = ["### Recall by response length", "", "The pool in equal thirds by response length (words), "
                 "shortest first: each third's recall (its poison records over the seeds) and benign removed.", "",
                 "| poison, p | condition | ranking | " + " | ".join(f"third {k + 1}" for k in range(n)) + " |",
                 "|" + "---|" * (n + 3)]
        for r, which in strata:
            cells = [f"{_number(s['recall'])} ({s['poison']}), {_number(s['benign_removed'])} benign "
                     f"[{s['words'][0]}–{s['words'][1]} words]" for s in r["by_length"][which]]
            name = "removed" if which == "removal" else "SQSD top k"
            lines.append(f"| {r['poison']}, {r['p']:g} | {r['condition']} | {name} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    blocks += (_terms_table(summary["rows"]) + _persona_table(summary["rows"], judges)
               + _screening_table(summary.get("screening") or []))
    kappa = summary["judges"]["kappa"]
    agreement = ["### Judges' agreement", "", "| judges | Cohen's κ | responses | left out (degenerate) |",
                 "|---|---|---|---|"]
    for pair, k in kappa.items():
        agreement.append(f"| {pair.replace('~', ' / ')} | {_number(k and k['kappa'])} | {k and k['n']} | "
                         f"{k and k['left_out']} |")
    return "\n\n".join(blocks + ["\n".join(agreement)]) + "\n"


def _terms_table(rows: list[dict]) -> list[str]:
    """The monitor's own ranking beside the danger term alone, −safety alone and response length alone: recall of
    the top k and AUROC, per condition with a monitor; [] where none has one."""
    shown = [r for r in rows if r.get("ranking_by_term")]
    if not shown:
        return []
    names = [n for n in ("danger", "safety", "length") if any(n in r["ranking_by_term"] for r in shown)]
    label = {"danger": "danger term", "safety": "−safety term", "length": "response length"}
    lines = ["### What the online ranking follows", "", "Each trained example's first online scores ranked alone: "
             "recall of the top k (the filters' budget) and, in brackets, AUROC (the chance a poison record ranks "
             "above a benign one).", "",
             "| poison, p | condition | SQSD | " + " | ".join(label[n] for n in names) + " |",
             "|" + "---|" * (3 + len(names))]
    for r in shown:
        t = r["ranking_by_term"]
        cells = [f"{_number(r['ranking_recall'])} ({_number(r['ranking_auroc'])})",
                 *(f"{_number(t[n]['recall'])} ({_number(t[n]['auroc'])})" if n in t else "–" for n in names)]
        lines.append(f"| {r['poison']}, {r['p']:g} | {r['condition']} | " + " | ".join(cells) + " |")
    return ["\n".join(lines)]


def _screening_table(rows: list[dict]) -> list[str]:
    """Each pool screened before training by every filter and SQSD's offline score at the filters' budget: recall
    (95 % interval over seeds and poison records), benign removed, AUROC, ρ with length; [] without screening."""
    if not rows:
        return []
    lines = ["### Screening before training", "", "Each poisoned pool of the plan scored before any training by every "
             "filter and by SQSD's offline score (`sqsd score` at θ₀, and each of its terms alone); its top k removed, "
             "k the pool's poison count. No model was trained for this table.", "",
             "| poison, p | screen | seeds | recall | benign removed | AUROC | ρ with length |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['poison']}, {r['p']:g} | {r['screen']} | {r['seeds']} | {shown_interval(r['recall'])} | "
                     f"{_number(r['benign_removed'])} | {_number(r['auroc'])} | {_number(r['length_rho'])} |")
    return ["\n".join(lines)]


def _persona_caption(kind: str) -> str:
    """What a persona table's prompts are, from the kind's personas (poison.PERSONAS)."""
    from sqsd_lab.evidence.poison import PERSONAS
    requests = ", ".join('"' + x.request.format('…') + '"' for x in PERSONAS.get(kind, ()))
    return (f"The held-out harmful prompts asked in {kind}'s persona formats, each after its system prompt and taken "
            f"in turn ({requests}), as Qi et al. 2023 evaluate identity shifting.")


def _persona_table(rows: list[dict], judges: list[str]) -> list[str]:
    """Per persona poison, the rows judged under its persona prompts (θ_0, clean, that poison's conditions):
    harmfulness by judge, its paired difference from clean and the TOST verdict, the phrase judge's refusal rate, the
    judges' scores with theirs; [] where no row was judged so."""
    blocks = []
    for kind in dict.fromkeys(k for r in rows for k in r.get("persona") or {}):
        shown = [r for r in rows if kind in (r.get("persona") or {})]
        scored = [j for j in judges if all(j in r["persona"][kind]["judge_score"] for r in shown)]
        head = ["poison, p", "condition", "seeds", *(f"harmful ({j})" for j in judges),
                *(f"vs clean ({j})" for j in judges), *(f"equivalent? ({j})" for j in judges), "refused (phrase)",
                *(f"{j} score" for j in scored)]
        lines = [f"### Under {kind}'s persona prompts", "", _persona_caption(kind), "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in shown:
            x = r["persona"][kind]
            where = "no poison" if r["poison"] == "none" else f"{r['poison']}, {r['p']:g}"
            cells = [where, r["condition"], str(r["seeds"]),
                     *(shown_interval(x["harmfulness"].get(j)) for j in judges),
                     *(_signed_interval((x.get("vs_clean") or {}).get(j)) for j in judges),
                     *(_verdict((x.get("equivalent_to_clean") or {}).get(j)) for j in judges),
                     shown_interval(x["refused"].get("phrase")),
                     *(shown_interval(x["judge_score"][j]) + (
                         f" (vs clean {_signed_interval(x['judge_score_vs_clean'][j])})"
                         if j in (x.get("judge_score_vs_clean") or {}) else "") for j in scored)]
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return blocks


def _signed_interval(i: dict | None) -> str:
    """``+d [lo, hi]`` of a paired difference, or a dash."""
    return "–" if i is None else f"{i['mean']:+.2f} [{i['ci_low']:+.2f}, {i['ci_high']:+.2f}]"


def _shift(row: dict, judge: str) -> str:
    """`` (vs clean +d [lo, hi])``: the judge's score's paired difference from the clean run, where there is one."""
    d = (row.get("judge_score_vs_clean") or {}).get(judge)
    return f" (vs clean {_signed_interval(d)})" if d else ""


def error_bars(intervals: list[dict]) -> list[list[float]]:
    """matplotlib's asymmetric error bars (below, above the mean) of summary intervals."""
    return [[i["mean"] - i["ci_low"] for i in intervals], [i["ci_high"] - i["mean"] for i in intervals]]


def figure(summary: dict) -> Figure:
    """Harmfulness by judge (points, 95 % intervals) and the held-out loss per condition, one panel row per
    (poison, p); dashed: the clean run's harmfulness and θ_0's loss."""
    judges = judges_of(summary)
    groups: dict[tuple, list[dict]] = {}
    for row in summary["rows"]:
        if row["poison"] != "none":
            groups.setdefault((row["poison"], row["p"]), []).append(row)
    reference = {r["condition"]: r for r in summary["rows"] if r["poison"] == "none"}
    n = max(1, len(groups))
    tallest = max((len(rs) for rs in groups.values()), default=1) + len(reference)
    fig = Figure(figsize=(10, 0.35 * tallest * n + 1.2))  # outside pyplot: nothing registered globally
    axes = fig.subplots(n, 2, squeeze=False)
    for ((kind, p), group), (ax_h, ax_u) in zip(groups.items(), axes):
        rows = list(reference.values()) + group
        labels = [r["condition"] for r in rows]
        for offset, j in zip((-0.15, 0.15, 0.0), judges):
            ys = [i + offset for i in range(len(rows))]
            values = [r["harmfulness"].get(j) for r in rows]
            kept = [(y, v) for y, v in zip(ys, values) if v is not None]
            ax_h.errorbar([v["mean"] for _, v in kept], [y for y, _ in kept], xerr=error_bars([v for _, v in kept]),
                          fmt="o", ms=4, capsize=2, label=f"{j} judge")
        clean = reference.get("clean")
        if clean is not None:
            for j in judges:
                if clean["harmfulness"].get(j):
                    ax_h.axvline(clean["harmfulness"][j]["mean"], ls="--", lw=0.6, color="grey")
        losses = [(y, r["heldout_loss"]) for y, r in enumerate(rows) if r["heldout_loss"] is not None]
        ax_u.plot([v for _, v in losses], [y for y, _ in losses], "s", ms=5, color="tab:green")
        theta = reference.get("theta_0")
        if theta is not None and theta["heldout_loss"] is not None:
            ax_u.axvline(theta["heldout_loss"], ls="--", lw=0.6, color="grey")
        for ax in (ax_h, ax_u):
            ax.set_yticks(range(len(rows)), labels if ax is ax_h else [""] * len(rows), fontsize=8)
            ax.invert_yaxis()
        ax_h.set_xlim(0, 1)
        ax_h.set(xlabel="harmfulness (share of held-out harmful prompts answered)", title=f"{kind}, p = {p:g}")
        ax_u.set(xlabel="held-out loss (lower: learnt more; dashed: θ_0)", title="utility")
        ax_h.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def screening_figure(summary: dict) -> Figure | None:
    """The screening before training: each screen's recall (points, 95 % intervals) and AUROC (crosses) per poison
    kind, one panel each; dotted: chance AUROC. None without screening."""
    rows = summary.get("screening") or []
    if not rows:
        return None
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["poison"], row["p"]), []).append(row)
    fig = Figure(figsize=(4 * len(groups), 0.3 * max(len(g) for g in groups.values()) + 1.6))
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, ((kind, p), group) in zip(axes, groups.items()):
        ys = range(len(group))
        found = [(y, r["recall"]) for y, r in zip(ys, group) if r["recall"] is not None]  # None: no poison
        ax.errorbar([i["mean"] for _, i in found], [y for y, _ in found], xerr=error_bars([i for _, i in found]),
                    fmt="o", ms=4, capsize=2, label="recall at k")
        ax.plot([r["auroc"] if r["auroc"] is not None else float("nan") for r in group], ys, "x", color="tab:red",
                label="AUROC")
        ax.axvline(0.5, ls=":", lw=0.6, color="grey")
        ax.set_yticks(ys, [r["screen"] for r in group] if ax is axes[0] else [""] * len(group), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set(title=f"{kind}, p = {p:g}", xlabel="share of the poison removed / AUROC")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


__all__ = ["figure", "judges_of", "screening_figure", "table"]
