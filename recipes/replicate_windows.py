"""The paper's window experiment: does fine-tuning on the riskiest SQSD window degrade safety most?

    python recipes/replicate_windows.py --quick            # embedded default, 5 seeds, 2 CPU cores, ~75 min
    python recipes/replicate_windows.py --model Qwen/Qwen3-8B --pool dolly.jsonl --directions runs/paper/directions \
        --checkpoint runs/paper/theta_t --held-out harmful_eval.jsonl --k 5 --out runs/windows

Scores the pool (danger at the checkpoint θ_t, safety at θ_0 + α·V_safety), cuts it into k windows by rank, twice:
over the whole pool, and within each value of the records' --strata-field (each window then has the pool's mix of
kinds); fine-tunes θ_0 on each window and on a random one with identical settings, and judges the answers to
held-out harmful prompts (phrase judge, likelihood judge). Writes <results>.md (tables), .png (plots) and .json. The
quick mode takes θ_0, the directions, the pool, θ_t and the held-out prompts from `sqsd demo`'s cache, running the
demo first where it has not run. Every finished window is kept under --out: a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from sqsd_callback.sinks import read_jsonl
from sqsd_lab.adapters import direction_sets, theta_0
from sqsd_lab.data import load_model, load_records, tokenize_chats
from sqsd_lab.demo import run_demo
from sqsd_lab.windows import across_seeds, reference, run_windows, score_variants, seeds_plot, seeds_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the embedded default, from sqsd demo's cache")
    p.add_argument("--cache", default="sqsd_demo", help="sqsd demo's cache folder (quick mode)")
    p.add_argument("--model", default=None, help="base model (full mode); θ_0 = it + the directions' aligned/")
    p.add_argument("--pool", help="benign prompt/response records to rank (full mode)")
    p.add_argument("--directions", help="a `sqsd directions` folder (full mode)")
    p.add_argument("--checkpoint", help="fine-tuning LoRA checkpoint θ_t where danger is taken (full mode)")
    p.add_argument("--held-out", help="held-out harmful prompts, a `prompt` per record (full mode: default the "
                   "directions' held_out.jsonl)")
    p.add_argument("--n-eval", type=int, default=None, help="held-out prompts in each evaluation (default: 64 with "
                   "--quick, 128 otherwise)")
    p.add_argument("--k", type=int, default=5, help="windows by rank")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds")
    p.add_argument("--strata-field", default="category", help="the records' field whose values the second ranking "
                   "ranks within (every record needs it)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--out", default=None, help="default: <cache>/windows (quick) or runs/windows")
    p.add_argument("--results", default=None, help="where the across-seeds tables, JSON and plots go (default: "
                   "benchmarks/results/windows-quick-cpu.* in quick mode, <out>/windows-seeds.* otherwise; the "
                   "within-strata ranking's plot as <results>-within.png)")
    opts = p.parse_args()

    start = time.perf_counter()
    if opts.quick:
        cache = Path(opts.cache)
        run_demo(cache)  # every finished stage is cached
        directions, pool, checkpoint = cache / "directions", cache / "data" / "finetune.jsonl", cache / "finetune"
        records, online = read_jsonl(pool), read_jsonl(checkpoint / "sqsd" / "scores.jsonl")
        out = Path(opts.out or cache / "windows")
        results = Path(opts.results or "benchmarks/results/windows-quick-cpu")
    else:
        missing = [f"--{n}" for n in ("pool", "directions", "checkpoint") if getattr(opts, n) is None]
        if missing:
            p.error(f"full mode needs {', '.join(missing)} (or run --quick)")
        directions, checkpoint = Path(opts.directions), Path(opts.checkpoint)
        records, online = load_records(opts.pool), None
        out = Path(opts.out or "runs/windows")
        results = Path(opts.results or out / "windows-seeds")
    missing = sum(opts.strata_field not in r for r in records)
    if missing:
        p.error(f"{missing} of {len(records)} pool records have no {opts.strata_field!r} field: give --strata-field "
                "a field every record has")
    strata = [str(r[opts.strata_field]) for r in records]
    held_out = opts.held_out or directions / "held_out.jsonl"
    n_eval = opts.n_eval or (64 if opts.quick else 128)
    prompts = [r["prompt"] for r in load_records(held_out, prompts_only=True)][:n_eval]
    model, tokenizer = load_model(opts.model)
    model = theta_0(model, directions)
    danger, safety = direction_sets(directions)
    sets = ((directions / "danger", danger), (directions / "safety", safety), checkpoint)
    samples = tokenize_chats(tokenizer, records, opts.max_length)
    variants = score_variants(model, samples, *sets, alpha=0.5)  # neither the seed nor the ranking changes them
    theta = reference(model, tokenizer, prompts, out / "theta_0")
    summaries: dict[str, list[dict]] = {"overall": [], "within strata": []}
    for seed in tqdm(opts.seeds, desc="training seeds"):
        for ranking, within in (("overall", False), ("within strata", True)):
            folder = out / f"{'within' if within else 'overall'}-k{opts.k}-seed{seed}"
            summaries[ranking].append(run_windows(
                model, tokenizer, records, prompts, folder, *sets, k=opts.k, alpha=0.5, rank=opts.rank,
                max_length=opts.max_length, online=online, seed=seed, strata=strata, within=within,
                variants=variants, num_train_epochs=opts.epochs, learning_rate=opts.lr))
    combined = {ranking: across_seeds(s) for ranking, s in summaries.items()}
    about = {"strata_field": opts.strata_field, "variants_rho": summaries["overall"][0]["variants_rho"],
             "n_eval": len(prompts), "epochs": opts.epochs, "lr": opts.lr, "rank": opts.rank,
             "minutes_this_invocation": (time.perf_counter() - start) / 60}
    results.parent.mkdir(parents=True, exist_ok=True)
    # per seed: each window's per-prompt outcomes and scores by judge (the answers are in <out>/*/judged.json)
    results.with_suffix(".json").write_text(json.dumps({**combined, "theta_0": theta, **about,
                                                        "per_seed": summaries}, indent=1))
    text = "\n".join(seeds_table(c, theta) for c in combined.values())
    results.with_suffix(".md").write_text(text)
    seeds_plot(combined["overall"], results.with_suffix(".png"), theta)
    seeds_plot(combined["within strata"], results.with_name(f"{results.name}-within.png"), theta)
    print(text)
    print(f"plots: {results.with_suffix('.png')}, {results.with_name(results.name + '-within.png')}; "
          f"{about['minutes_this_invocation']:.1f} min")


if __name__ == "__main__":
    main()
