"""How far the sampled drift (``SQSDConfig.drift_sample``) is from the exact one: one full fine-tuning run watched
by two callbacks side by side, one keeping θ_0 whole and one keeping it at 1 entry in k, compared at every step.

Projections are exact either way (they differ only by fp32 rounding); the norm ‖θ_t − θ_0‖, and so the cosines,
are estimates. Writes JSON with each step's relative errors and prints the worst.

    python benchmarks/drift_sample.py --samples 4 16 64
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from overhead import build, machine, random_sets

from sqsd_callback import SQSDCallback
from sqsd_callback.sinks import read_jsonl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, nargs="+", default=[4, 16, 64], help="drift_sample values to compare")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dir-rank", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/drift-sample-fullft-cpu.json")
    opts = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    opts.shape, opts.full_ft, opts.bf16, opts.rank, opts.steps_per_round = "smollm2-135m", True, False, 16, opts.steps
    tmp = Path(tempfile.mkdtemp())
    trainer, _ = build(opts, None, str(tmp / "run"))
    danger, safety = random_sets(trainer.model, opts.dir_rank)
    for k in [1, *opts.samples]:
        trainer.add_callback(SQSDCallback(danger, safety, output_dir=str(tmp / f"sample{k}"), drift_sample=k))
    trainer.train()
    exact = read_jsonl(tmp / "sample1" / "drift.jsonl")
    keys = [k for k in exact[0] if k.startswith(("cosine/", "projection/"))]
    result = {"config": vars(opts), "machine": machine(), "steps": len(exact), "per_sample": {}}
    print(f"{'drift_sample':>12} {'norm rel. err (max)':>20} {'cosine rel. err (max)':>22} {'projection (max)':>17}")
    for k in opts.samples:
        rows = read_jsonl(tmp / f"sample{k}" / "drift.jsonl")

        def rel(key, rows=rows):
            return [abs(r[key] - e[key]) / abs(e[key]) for r, e in zip(rows, exact)]
        norm = rel("norm")
        cos = [max(v) for v in zip(*(rel(c) for c in keys if c.startswith("cosine/")))]
        proj = [max(v) for v in zip(*(rel(c) for c in keys if c.startswith("projection/")))]
        result["per_sample"][k] = {"norm_rel_err": norm, "cosine_rel_err": cos, "projection_rel_err": proj}
        print(f"{k:>12} {max(norm):>20.2e} {max(cos):>22.2e} {max(proj):>17.2e}")
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {opts.out}")


if __name__ == "__main__":
    main()
