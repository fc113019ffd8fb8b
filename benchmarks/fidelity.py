"""Fidelity: how closely the fast hooks engine and the torch.func engine reproduce the paper's batch-size-1 loop.

Tiny Llama and Qwen2 models (random weights, fp32), LoRA (nonzero B) and full fine-tuning (5 of the 7 Linear
layers of each block), every metric, two danger
sets (low-rank and dense) and one safety set, padded batches of 8. For each (model, training, metric, engine) the
largest relative disagreement with the loop over every score key: max |engine − loop| / max |loop|. Writes JSON
and prints a table.

    python benchmarks/fidelity.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sqsd_callback import score_samples
from sqsd_lab.tiny import random_samples, rel_err, three_sets, tiny_full_ft, tiny_lora

KEYS = ["danger", "safety", "sqsd", "danger/d1", "danger/d2", "safety/s1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results/fidelity.json")
    opts = p.parse_args()
    samples = random_samples(opts.examples, seed=4, max_len=24)
    results = []
    for arch in ("llama", "qwen2"):
        for training, build in (("lora", tiny_lora), ("full", tiny_full_ft)):
            model = build(arch)
            danger, safety = three_sets(model)
            for metric in ("cosine", "projection", "global_cosine"):
                ref = score_samples(model, samples, danger, safety, metric=metric, engine="loop", progress=False)
                for engine in ("hooks", "vmap"):
                    got = score_samples(model, samples, danger, safety, metric=metric, engine=engine, batch_size=8,
                                        progress=False)
                    err = max(rel_err([r[k] for r in got], [r[k] for r in ref]) for k in KEYS)
                    results.append({"arch": arch, "training": training, "metric": metric, "engine": engine,
                                    "max_rel_err": err})
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"examples": opts.examples, "torch": torch.__version__, "results": results}, indent=1))
    print("| model | training | metric | hooks vs loop | vmap vs loop |\n|---|---|---|---|---|")
    for i in range(0, len(results), 2):
        h, v = results[i], results[i + 1]
        print(f"| {h['arch']} | {h['training']} | {h['metric']} | {h['max_rel_err']:.1e} | {v['max_rel_err']:.1e} |")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
