"""What a shared random A did to the monitored runs: runs whose LoRA adapter started from a direction set's own A
against runs of the same settings that did not.

    python recipes/shared_start.py --quick                        # the runs cached in sqsd demo's cache
    python recipes/shared_start.py --quick --demo old=/tmp/demo   # ... and other demo caches' fine-tunes

Until train_lora took ``init_seed``, every adapter it trained started from the training seed: the directions'
danger and safety adapters, the demo's fine-tune, and in one process whichever came first. Per run this reads the
saved adapters (no training): the mean |cosine| between the run's A factors and each set's, the run's drift at
its first and last step, and the median |projection| per set over the first epoch's scores. Writes
benchmarks/results/shared-start-quick-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from sqsd_callback.directions import DirectionSet
from sqsd_callback.layers import a_cosine
from sqsd_callback.sinks import read_jsonl


def measure(run: Path, sets: dict[str, Path]) -> dict:
    """A-cosine with each set, drift at the first and last step, median |projection| per scored set (epoch 1)."""
    mine = {m: d.A for m, d in DirectionSet.from_peft_adapter(run, kind="danger").modules.items()}
    drift = list(read_jsonl(run / "sqsd" / "drift.jsonl"))
    first: dict = {}
    for r in read_jsonl(run / "sqsd" / "scores.jsonl"):
        if r["index"] is not None and r["sqsd"] is not None:
            first.setdefault(r["index"], r)
    keys = [k for k in next(iter(first.values())) if k.startswith(("danger/", "safety/"))]
    return {"a_cosine": {name: a_cosine(mine, DirectionSet.from_peft_adapter(path, kind="danger"))[0]
                         for name, path in sets.items()},
            "drift_first": drift[0]["drift"], "drift_last": drift[-1]["drift"], "steps": drift[-1]["step"],
            "median_abs": {k: statistics.median(abs(r[k]) for r in first.values()) for k in keys}}


def runs(cache: Path, demos: dict[str, Path]) -> list[tuple[str, Path, dict[str, Path]]]:
    """(label, run folder, {set name: adapter folder}) for every cached run that has a shared-start twin."""
    dirs = {n: cache / "directions" / n for n in ("danger", "safety")}
    out = [(f"demo fine-tune, {name}", demo / "finetune", {n: demo / "directions" / n for n in ("danger", "safety")})
           for name, demo in demos.items()]
    out.append(("demo fine-tune (this cache)", cache / "finetune", dirs))
    out.append(("clean pool, seed 0 (drift signals)", cache / "drift_signals" / "p0" / "seed0", dirs))
    for slug in ("monitor_only", "drop_z_score_2", "anchor", "drift_stop"):
        for when, root in (("shared start", cache / "protect_shared_init"), ("rerun", cache / "protect")):
            out.append((f"p = 10%, {slug}, seed 0, {when}", root / "p0.1" / slug / "seed0", dirs))
    for when, root in (("shared start", cache / "danger_strength_shared_init"), ("rerun", cache / "danger_strength")):
        out.append((f"stronger danger set, monitored, {when}", root / "monitored",
                    {"weak": dirs["danger"], "strong": root / "directions" / "danger", "safety": dirs["safety"]}))
    return [(label, run, sets) for label, run, sets in out  # finished runs: the adapter is saved at the end
            if (run / "sqsd" / "scores.jsonl").is_file() and (run / "adapter_model.safetensors").is_file()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", required=True, help="sqsd demo's cache (the only mode)")
    ap.add_argument("--cache", default="sqsd_demo")
    ap.add_argument("--demo", nargs="*", default=[], metavar="NAME=CACHE", help="other demo caches to include")
    ap.add_argument("--results", default="benchmarks/results/shared-start-quick-cpu")
    opts = ap.parse_args()
    demos = dict(d.split("=", 1) for d in opts.demo)
    rows = [{"run": label, **measure(run, sets)} for label, run, sets in runs(Path(opts.cache),
                                                                                {k: Path(v) for k, v in demos.items()})]
    lines = ["| run | mean abs cosine of A with each set | drift, first step → last | median abs projection, "
             "epoch 1 |", "|---|---|---|---|"]
    for r in rows:
        cos = ", ".join(f"{k} {v:.2f}" for k, v in r["a_cosine"].items())
        med = ", ".join(f"{k} {v:.3f}" for k, v in r["median_abs"].items())
        lines.append(f"| {r['run']} | {cos} | {r['drift_first']:+.4f} → {r['drift_last']:+.4f} "
                     f"(step {r['steps']}) | {med} |")
    res = Path(opts.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    res.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
