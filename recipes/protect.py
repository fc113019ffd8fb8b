"""Does the callback keep a poisoned fine-tune safe? The protection experiment (see sqsd_callback/protect.py).

    python recipes/protect.py --quick              # embedded default on 2 CPU cores, from sqsd demo's cache
    python recipes/protect.py --model Qwen/Qwen3-8B --directions runs/paper/directions --pool dolly.jsonl \
        --calibration benign_heldout.jsonl --poison harmful_compliance.jsonl --shares 0 0.05 0.1 0.2 --out runs/protect

Every (share, condition, seed) result is cached under --out as it finishes; a rerun continues where the last one
stopped, and the tables, JSON and plot are rewritten after every run from what is there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from sqsd_lab.demo import run_demo
from sqsd_lab.protect import CONDITIONS, Experiment, Inputs, Settings, plot, summarize, table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the embedded default, from sqsd demo's cache")
    p.add_argument("--cache", default="sqsd_demo", help="sqsd demo's cache folder (quick mode)")
    p.add_argument("--model", help="base model (full mode; θ_0 = it + the directions' aligned/)")
    p.add_argument("--directions", help="a `sqsd directions` folder with aligned/, danger/, safety/ (full mode)")
    p.add_argument("--pool", help="benign prompt/response JSONL to poison (full mode)")
    p.add_argument("--calibration", help="benign prompt/response JSONL never trained on (full mode)")
    p.add_argument("--poison", help="harmful prompt/compliant response JSONL (full mode)")
    p.add_argument("--shares", type=float, nargs="+", default=None, help="shares p of harmful examples "
                   "(quick: 0 0.1; full: 0 0.05 0.1 0.2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--conditions", nargs="+", default=None, help="condition names (default: all)")
    p.add_argument("--out", default=None, help="default: <cache>/protect (quick) or runs/protect")
    p.add_argument("--results", default=None, help="where the table, JSON and plot go "
                   "(default: benchmarks/results/protect-quick-cpu.* in quick mode, <out>/protect.* otherwise)")
    opts = p.parse_args()
    if opts.quick:
        run_demo(opts.cache)  # every finished stage is cached
        out = Path(opts.out or Path(opts.cache) / "protect")
        inputs = Inputs.from_demo(opts.cache, out)
        results = Path(opts.results or "benchmarks/results/protect-quick-cpu")
        shares = opts.shares or [0.0, 0.1]
    else:
        missing = [f"--{n}" for n in ("directions", "pool", "calibration", "poison") if getattr(opts, n) is None]
        if missing:
            p.error(f"full mode needs {', '.join(missing)} (or run --quick)")
        out = Path(opts.out or "runs/protect")
        inputs = Inputs(Path(opts.directions), Path(opts.pool), Path(opts.calibration), Path(opts.poison), opts.model)
        results = Path(opts.results or out / "protect")
        shares = opts.shares or [0.0, 0.05, 0.1, 0.2]
    conditions = [c for c in CONDITIONS if opts.conditions is None or c.name in opts.conditions]
    settings = Settings(shares=tuple(shares), seeds=tuple(opts.seeds))
    experiment = Experiment(inputs, out, settings)
    plan = [(share, c, seed) for seed in settings.seeds for share in settings.shares for c in conditions
            if c.poisoned == (share > 0)]
    start = time.perf_counter()
    for share, condition, seed in tqdm(plan, desc="protect runs"):
        experiment.run(share, condition, seed)
        done = experiment.finished()
        summary = summarize(done)
        results.parent.mkdir(parents=True, exist_ok=True)
        results.with_suffix(".json").write_text(json.dumps({
            "settings": vars(settings), "threshold": experiment.threshold, "summary": summary,
            "runs": [{k: v for k, v in r.items() if k != "complied"} for r in done],
            "minutes_this_invocation": (time.perf_counter() - start) / 60}, indent=1, default=str))
        results.with_suffix(".md").write_text(table(summary))
        plot(summary, results.with_suffix(".png"))
    print(table(summarize(experiment.finished())))


if __name__ == "__main__":
    main()
