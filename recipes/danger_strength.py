"""Is the demo's danger adapter too weak? A stronger one, and what it changes in the rankings and the protection.

    python recipes/danger_strength.py --quick --epochs 6              # sqsd demo's cache, 2 CPU cores
    python recipes/danger_strength.py --quick --epochs 2 --more-data  # more records instead of more epochs

Every stage is cached under <cache>/danger_strength (<cache>/danger_more_data with ``--more-data``), so a rerun
continues:
1. the stronger danger adapter: the demo's (the same 64 compliant records, θ_0, rank and learning rate) trained for
   ``--epochs`` epochs instead of 2, with ``--more-data`` also on the protection experiment's harmful compliance
   records that its 10% pool does not use, in a directions folder that shares the demo's aligned and safety
   adapters;
2. both danger adapters' size ‖s·B·A‖ and the cosine between them;
3. one monitored fine-tune of the demo's benign pool (seed 0) scored against both danger sets at once: per-example
   |danger| against |safety|, and Spearman's rho between the two danger terms and between the two SQSD rankings
   (first epoch);
4. the protection experiment's drop conditions with the stronger set (seeds ``--seeds``), to set beside
   benchmarks/results/protect-quick-cpu.md, which used the demo's.
Writes benchmarks/results/danger-strength-quick-cpu.{json,md} (danger-more-data-quick-cpu with ``--more-data``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from tqdm.auto import tqdm

from sqsd_callback.callback import SQSDCallback
from sqsd_callback.directions import DirectionSet
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.adapters import init_seed, theta_0
from sqsd_lab.data import load_model, tokenize_chats
from sqsd_lab.demo import DemoSizes, run_demo
from sqsd_lab.evidence import stats
from sqsd_lab.evidence.report import shown_rho
from sqsd_lab.finetune import lora_config, train_lora
from sqsd_lab.protect import BY_NAME, Experiment, Inputs, Settings, poisoned_pool, summarize, table

CONDITIONS = ("drop z-score > 2", "robust z > 3, kept out")


def strong_directions(cache: Path, out: Path, epochs: float, records: list[dict], model, tokenizer) -> Path:
    """A directions folder whose danger adapter is trained like the demo's for ``epochs`` epochs on ``records``,
    from its own random A (aligned, safety and held-out prompts linked from the demo's)."""
    demo, folder = cache / "directions", out / "directions"
    if not (folder / "danger" / "adapter_model.safetensors").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("aligned", "safety", "held_out.jsonl", "directions.json"):
            if not (folder / name).exists():
                (folder / name).symlink_to((demo / name).resolve())
        sizes = DemoSizes()
        train_lora(model, tokenizer, tokenize_chats(tokenizer, records, sizes.max_length), folder / "danger",
                   lora=lora_config(sizes.rank), num_train_epochs=epochs, learning_rate=sizes.learning_rate,
                   init_seed=init_seed("danger"))
    return folder


def size_and_cosine(weak: DirectionSet, strong: DirectionSet) -> dict:
    """‖V‖ of each set (over all modules) and the cosine between them."""
    dot = sum(float((weak.modules[m].materialize() * strong.modules[m].materialize()).sum()) for m in weak.modules)
    norm = {k: math.sqrt(sum(float(v.materialize().pow(2).sum()) for v in s.modules.values()))
            for k, s in (("weak", weak), ("strong", strong))}
    return {"norm_weak": norm["weak"], "norm_strong": norm["strong"],
            "cosine": dot / (norm["weak"] * norm["strong"])}


def rankings(cache: Path, out: Path, model, tokenizer, weak, strong, safety) -> dict:
    """One monitored fine-tune scored against both danger sets; the terms' sizes and the rankings' agreement."""
    folder = out / "monitored"
    if not (folder / "sqsd" / "scores.jsonl").is_file():
        sizes = DemoSizes()
        samples = tokenize_chats(tokenizer, read_jsonl(cache / "data" / "finetune.jsonl"), sizes.max_length)
        train_lora(model, tokenizer, samples, folder, lora=lora_config(sizes.rank),
                   callbacks=[SQSDCallback(danger=[weak, strong], safety=[safety])], num_train_epochs=sizes.epochs,
                   learning_rate=sizes.learning_rate, seed=0, logging_steps=4)
    first = {}
    for r in read_jsonl(folder / "sqsd" / "scores.jsonl"):
        if r["index"] is not None and r["sqsd"] is not None:
            first.setdefault(r["index"], r)
    rows = list(first.values())
    d_weak, d_strong = [r["danger/weak"] for r in rows], [r["danger/strong"] for r in rows]
    s = [r["safety/safety"] for r in rows]
    return {"examples": len(rows),
            "median_abs": {"danger weak": statistics.median(map(abs, d_weak)),
                           "danger strong": statistics.median(map(abs, d_strong)),
                           "safety": statistics.median(map(abs, s))},
            "rho_danger_terms": stats.spearman(d_weak, d_strong),
            "rho_sqsd_rankings": stats.spearman([a - c for a, c in zip(d_weak, s)],
                                                [b - c for b, c in zip(d_strong, s)]),
            "rho_sqsd_weak_with_safety": stats.spearman([a - c for a, c in zip(d_weak, s)], s),
            "rho_sqsd_strong_with_safety": stats.spearman([b - c for b, c in zip(d_strong, s)], s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", required=True, help="sqsd demo's cache (the only mode)")
    ap.add_argument("--cache", default="sqsd_demo")
    ap.add_argument("--epochs", type=float, default=6.0, help="the stronger danger adapter's epochs (the demo: 2)")
    ap.add_argument("--more-data", action="store_true",
                    help="also train on the harmful compliance records the protection experiment's 10%% pool leaves")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), help="protection conditions to run")
    ap.add_argument("--results", default=None, help="default: benchmarks/results/danger-strength-quick-cpu "
                    "(danger-more-data-quick-cpu with --more-data)")
    opts = ap.parse_args()
    cache = Path(opts.cache)
    run_demo(cache)
    out = cache / ("danger_more_data" if opts.more_data else "danger_strength")
    records = read_jsonl(cache / "directions" / "danger" / "train.jsonl")
    if opts.more_data:
        if not (cache / "protect" / "poison.jsonl").is_file():
            raise SystemExit("--more-data trains on the protection experiment's harmful compliance records: run "
                             "`python recipes/protect.py --quick` first (it writes <cache>/protect/poison.jsonl).")
        poison = read_jsonl(cache / "protect" / "poison.jsonl")
        used = sum(r["harmful"] for r in poisoned_pool(read_jsonl(cache / "data" / "finetune.jsonl"), poison, 0.1))
        records = records + poison[used:]
    model, tokenizer = load_model(None)
    theta_0(model, cache / "directions")
    folder = strong_directions(cache, out, opts.epochs, records, model, tokenizer)
    weak = DirectionSet.from_peft_adapter(cache / "directions" / "danger", kind="danger", name="weak")
    strong = DirectionSet.from_peft_adapter(folder / "danger", kind="danger", name="strong")
    safety = DirectionSet.from_peft_adapter(cache / "directions" / "safety", kind="safety", name="safety")
    result = {"epochs": opts.epochs, "records": len(records), "sets": size_and_cosine(weak, strong),
              "rankings": rankings(cache, out, model, tokenizer, weak, strong, safety)}
    del model
    inputs = Inputs(folder, cache / "data" / "finetune.jsonl", cache / "data" / "retention.jsonl",
                    cache / "protect" / "poison.jsonl")
    experiment = Experiment(inputs, out / "protect", Settings(shares=(0.1,), seeds=tuple(opts.seeds)))
    for name, seed in tqdm([(c, s) for c in opts.conditions for s in opts.seeds], desc="protect runs (strong danger)"):
        experiment.run(0.1, BY_NAME[name], seed)
    summary = summarize(experiment.finished())
    result["protect"] = summary
    res = Path(opts.results or "benchmarks/results/" + ("danger-more-data" if opts.more_data else "danger-strength")
               + "-quick-cpu")
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    sets, rk = result["sets"], result["rankings"]
    text = (f"Danger adapter trained {opts.epochs:g} epochs on {len(records)} records (the demo's: 2 epochs on 64). "
            f"‖V‖ {sets['norm_weak']:.3f} → "
            f"{sets['norm_strong']:.3f}, cosine between them {sets['cosine']:.3f}.\n\n"
            f"One monitored fine-tune (seed 0, first epoch, {rk['examples']} examples): median |danger| "
            f"{rk['median_abs']['danger weak']:.3f} (demo's set) and {rk['median_abs']['danger strong']:.3f} "
            f"(stronger) against median |safety| {rk['median_abs']['safety']:.3f}; Spearman's rho between the two "
            f"danger terms {shown_rho(rk['rho_danger_terms'])}, between the two SQSD rankings "
            f"{shown_rho(rk['rho_sqsd_rankings'])}; SQSD with the safety term "
            f"{shown_rho(rk['rho_sqsd_weak_with_safety'])} "
            f"(demo's set) and {shown_rho(rk['rho_sqsd_strong_with_safety'])} (stronger).\n\n"
            f"Protection with the stronger danger set (p = 10%):\n\n{table(summary)}")
    res.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
