"""Why the monitored run's online scores and the paper's offline scores rank the pool differently.

    python recipes/online_offline.py --quick     # sqsd demo's cache: its 128 records, its monitored run, ~10 min

An example's SQSD is the cosine of its update ΔW_i with the directions, and ΔW_i depends on where and in which
parameter space it is taken. The online score is the run's own update at the step's parameters θ_s, in the run's
LoRA subspace (at a fresh adapter B = 0, so ΔW_i = −s gB_i A: the update is confined to the random rows of A);
the paper scores danger at a trained checkpoint θ_t and safety at θ_0 + α·V_safety, in those adapters' subspaces.
This scores the same records under each of these choices and reports Spearman's rho between every pair, so the
gap can be attributed: online epoch 1 and 2 (the run's rows), the paper's offline scores, a fresh LoRA adapter at
θ_0 (the run's first step, another random A), the trained adapter θ_T for every set, and the full weight gradient
at θ_0 (no adapter subspace at all). For each variant it also reports the size of the danger and safety terms and
which of them, and how much the response's length, the ranking follows: the paper's danger term at a checkpoint
is taken in the fine-tune's subspace, its safety term in the safety adapter's own, and a term is large only in its
own adapter's row space. Writes benchmarks/results/online-offline-quick-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from peft import get_peft_model

from sqsd_callback.offline import ScoringPass, paper_passes, score_offline
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.adapters import direction_sets, theta_0
from sqsd_lab.data import load_model, tokenize_chats
from sqsd_lab.evidence import stats
from sqsd_lab.evidence.report import shown_rho
from sqsd_lab.finetune import lora_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", required=True, help="sqsd demo's cache (the only mode)")
    p.add_argument("--cache", default="sqsd_demo")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--results", default="benchmarks/results/online-offline-quick-cpu")
    opts = p.parse_args()
    start, cache = time.perf_counter(), Path(opts.cache)
    directions, checkpoint = cache / "directions", cache / "finetune"
    model, tokenizer = load_model(None)
    model = theta_0(model, directions)
    danger, safety = direction_sets(directions)
    samples = tokenize_chats(tokenizer, read_jsonl(cache / "data" / "finetune.jsonl"), opts.max_length)
    samples = [dict(s, index=i) for i, s in enumerate(samples)]
    online = read_jsonl(checkpoint / "sqsd" / "scores.jsonl")
    steps_per_epoch = len({r["step"] for r in online}) // 2
    variants = {f"online, epoch {e + 1}": {r["index"]: _terms(r) for r in online
                                            if r["sqsd"] is not None and r["step"] // steps_per_epoch == e}
                for e in range(2)}
    both = [danger, safety]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        fresh = get_peft_model(model, lora_config(8))  # B = 0, A random: the run's first step, another draw
        fresh.save_pretrained(tmp)
        fresh.unload()
        passes = {
            "offline, paper (danger at θ_t, safety at θ_0 + 0.5·V)":
                paper_passes([(directions / "danger", danger)], [(directions / "safety", safety)], checkpoint),
            "offline, paper without θ_t (each set at θ_0 + 0.5·its own V)":
                paper_passes([(directions / "danger", danger)], [(directions / "safety", safety)]),
            "offline, fresh LoRA at θ_0 (B = 0)": [ScoringPass(tmp, both)],
            "offline, trained LoRA θ_T (every set)": [ScoringPass(checkpoint, both)],
            "offline, full weight gradient at θ_0": [ScoringPass(None, both)],
        }
        for name, ps in passes.items():  # each variant's scores are cached: a rerun continues
            done = cache / "online_offline" / f"{_slug(name)}.json"
            if not done.is_file():
                full = ps[0].adapter is None
                model.requires_grad_(full)  # full weight gradients: the Linear weights are the scored targets
                rows = score_offline(model, samples, ps)
                model.requires_grad_(False)
                done.parent.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps({r["index"]: _terms(r) for r in rows if r["sqsd"] is not None}))
            variants[name] = {int(i): v for i, v in json.loads(done.read_text()).items()}
    names = list(variants)
    sqsd = {a: {i: v["sqsd"] for i, v in variants[a].items()} for a in names}
    rho = {a: {b: _rho(sqsd[a], sqsd[b]) for b in names} for a in names}
    length = {s["index"]: sum(1 for t in s["labels"] if t != -100) for s in samples}  # scored response tokens
    terms = {a: {"median abs danger": median(abs(v["danger"]) for v in variants[a].values()),
                 "median abs safety": median(abs(v["safety"]) for v in variants[a].values()),
                 **{f"rho with {k}": _rho(sqsd[a], {i: v[k] for i, v in variants[a].items()})
                    for k in ("danger", "safety")},
                 "rho with response tokens": _rho(sqsd[a], length)} for a in names}
    result = {"records": len(samples), "rho": rho, "terms": terms, "minutes": (time.perf_counter() - start) / 60,
              "machine": "2 CPU cores, torch " + torch.__version__}
    out = Path(opts.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    short = [f"({i + 1})" for i in range(len(names))]
    lines = ["| | score variant | " + " | ".join(short) + " |", "|---|---|" + "---|" * len(names),
             *[f"| ({i + 1}) | {a} | " + " | ".join(shown_rho(rho[a][b]) for b in names) + " |"
               for i, a in enumerate(names)], "",
             f"Spearman's rho over the {len(samples)} records of sqsd demo's pool; {result['minutes']:.1f} min.", "",
             "| | score variant | " + " | ".join(terms[names[0]]) + " |", "|---|---|" + "---|" * len(terms[names[0]]),
             *[f"| ({i + 1}) | {a} | " + " | ".join(f"{v:.2f}" if k.startswith("median") else shown_rho(v)
                                                   for k, v in terms[a].items()) + " |" for i, a in enumerate(names)],
             "", "The size of each term (medians over the records) and Spearman's rho of SQSD with each term and with "
             "the number of scored response tokens."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _terms(row: dict) -> dict:
    return {k: row[k] for k in ("danger", "safety", "sqsd")}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.split("(")[0].lower()).strip("-")


def _rho(a: dict, b: dict) -> float | None:
    common = sorted(set(a) & set(b))
    return stats.spearman([a[i] for i in common], [b[i] for i in common])


if __name__ == "__main__":
    main()
