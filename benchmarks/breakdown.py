"""Where the monitor's step time goes: the overhead.py run with parts of SQSDCallback switched off, side by side.

Variants, A/B interleaved in one process like overhead.py: ``none`` (no callback); ``taps`` (the callback with
its hooks and autograd taps, but the engine's per-example math and the drift switched off); ``math`` (+ the
per-example math); ``full`` (+ the drift). Differences of medians attribute the overhead; a torch.profiler
pass over full steps lists the operators that take the time. Writes JSON and prints a table.

    python benchmarks/breakdown.py                                  # SmolLM2-135M widths, 4 layers, batch 8×128
    python benchmarks/breakdown.py --shape narrow --layers 30 --seq 64   # per-operation-overhead regime
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from overhead import SHAPES, build, machine

from sqsd_callback import drift
from sqsd_callback.layers.linear import LinearHooks
from sqsd_callback.layers.lora import LoraHooks

VARIANTS = ("none", "taps", "math", "full")


@contextmanager
def switched_off(variant: str):
    """Replace the engine's per-example math (``taps``) and the drift (``taps``, ``math``) with no-ops."""
    saved = [(LoraHooks, "backward"), (LinearHooks, "backward"), (LoraHooks, "finish"),
             (LinearHooks, "finish"), (drift.Drift, "measure")]
    originals = [getattr(owner, name) for owner, name in saved]
    if variant == "taps":
        for owner, name in saved[:4]:
            setattr(owner, name, lambda *args, **kwargs: None)
    if variant in ("taps", "math"):
        drift.Drift.measure = lambda self: {"cosine": [0.0] * len(self.bank.sets),
                                            "projection": [0.0] * len(self.bank.sets), "norm": 0.0, "layers": {}}
    try:
        yield
    finally:
        for (owner, name), f in zip(saved, originals):
            setattr(owner, name, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--full-ft", action="store_true")
    p.add_argument("--dir-rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps-per-round", type=int, default=3, help="the first step of each round is a warm-up")
    p.add_argument("--top", type=int, default=15, help="operators listed from the profiler pass")
    p.add_argument("--out", default="benchmarks/results/breakdown.json")
    opts = p.parse_args()
    opts.bf16 = False
    os.environ.setdefault("WANDB_MODE", "disabled")
    tmp = tempfile.TemporaryDirectory()
    built = {v: build(opts, None if v == "none" else "hooks", f"{tmp.name}/{v}") for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for _ in range(opts.rounds):
        for v in VARIANTS:
            trainer, timer = built[v]
            timer.times = []
            with switched_off(v):
                trainer.train()
            times[v] += timer.times[1:]
    median = {v: statistics.median(ts) for v, ts in times.items()}
    parts = {"taps": median["taps"] - median["none"], "per_example_math": median["math"] - median["taps"],
             "drift": median["full"] - median["math"]}

    trainer, _ = built["full"]
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=activities) as prof:
        trainer.train()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    top = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))[:opts.top]
    ops = [{"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3} for e in top]
    sqsd = [{"region": e.key, "calls": e.count, "total_ms": e.cpu_time_total / 1e3}
            for e in prof.key_averages() if e.key.startswith(("sqsd::", "_TapBackward"))]

    result = {"config": vars(opts), "machine": machine(), "median_step_time_s": median,
              "overhead_s": parts, "overhead_fraction_of_plain_step": {k: v / median["none"] for k, v in parts.items()},
              "step_time_ratio": median["full"] / median["none"], "profiler_top_ops": ops, "profiler_sqsd": sqsd}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'variant':>8} {'median step (s)':>16}")
    for v in VARIANTS:
        print(f"{v:>8} {median[v]:>16.4f}")
    print(f"\n{'part':>17} {'s/step':>8} {'of plain step':>14}")
    for k, v in parts.items():
        print(f"{k:>17} {v:>8.4f} {v / median['none']:>13.1%}")
    print(f"\n{'top operators (full variant)':<60} {'calls':>7} {'self ms':>9}")
    for o in ops:
        print(f"{o['op'][:60]:<60} {o['calls']:>7} {o['self_ms']:>9.1f}")
    print(f"\nwrote {opts.out}")


if __name__ == "__main__":
    main()
