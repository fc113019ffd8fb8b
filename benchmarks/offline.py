"""Offline scoring throughput: the batched hooks engine against the paper's batch-size-1 loop, same data.

Both score the same examples at the same parameters on a SmolLM2-135M-sized Llama (random weights, LoRA r=16 on
every linear layer, 2 danger + 1 safety direction sets); the paper's initialisations (danger at θ_t, safety at
θ_0 + α·V_safety) are two such passes, each timed here as one. Writes JSON and prints examples/s, the speed-up
and the largest relative disagreement between the two. With --max-tokens, the hooks engine also runs under each
token budget (padded tokens per batch), reporting examples/s and peak memory (CUDA: max allocated; CPU: the peak
of PyTorch's allocations, from the profiler's memory events): long inputs are where the budget matters.

    python benchmarks/offline.py --examples 64 --seq 128
    python benchmarks/offline.py --examples 8 --seq 1500 --layers 4 --batch-sizes 8 --loop-examples 2 \
        --max-tokens none,8192,4096 --out benchmarks/results/offline-long-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from overhead import allocation_peak, random_sets
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from sqsd_callback import score_samples
from sqsd_lab.tiny import ALL_LINEAR, SMOLLM2_135M, rel_err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    p.add_argument("--batch-sizes", default="8,16", help="batch sizes for the hooks engine")
    p.add_argument("--loop-examples", type=int, default=16, help="examples timed with the slow loop")
    p.add_argument("--max-tokens", default="", help="token budgets to compare at the first batch size, e.g. "
                   "none,8192,4096")
    p.add_argument("--out", default="benchmarks/results/offline.json")
    opts = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": opts.layers}))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR)).to(device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    danger, safety = random_sets(model, 16)
    g = torch.Generator().manual_seed(1)
    samples = []
    for i in range(opts.examples):
        n = int(torch.randint(opts.seq // 2, opts.seq + 1, (1,), generator=g))
        ids = torch.randint(3, SMOLLM2_135M["vocab_size"], (n,), generator=g).tolist()
        samples.append({"input_ids": ids, "labels": [-100] * (n // 4) + ids[n // 4:], "index": i})

    def timed(engine, batch_size, subset):
        score_samples(model, subset[:batch_size], danger, safety, engine=engine, batch_size=batch_size,
                      progress=False)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        rows = score_samples(model, subset, danger, safety, engine=engine, batch_size=batch_size, progress=False)
        if device == "cuda":
            torch.cuda.synchronize()
        return rows, len(subset) / (time.perf_counter() - t)

    loop_rows, loop_rate = timed("loop", 1, samples[:opts.loop_examples])
    result = {"config": vars(opts), "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                                 "torch": torch.__version__, "device": device},
              "loop_examples_per_s": loop_rate, "hooks": {}}
    print(f"{'engine':>8} {'batch':>6} {'examples/s':>11} {'speed-up':>9} {'max rel diff':>13}")
    print(f"{'loop':>8} {1:>6} {loop_rate:>11.2f} {1.0:>9.2f} {'-':>13}")
    for bs in map(int, opts.batch_sizes.split(",")):
        rows, rate = timed("hooks", bs, samples)
        err = rel_err([r["sqsd"] for r in rows[:opts.loop_examples]], [r["sqsd"] for r in loop_rows])
        result["hooks"][bs] = {"examples_per_s": rate, "speedup": rate / loop_rate, "max_rel_diff_vs_loop": err}
        print(f"{'hooks':>8} {bs:>6} {rate:>11.2f} {rate / loop_rate:>9.2f} {err:>13.2e}")
    budgets = [None if b == "none" else int(b) for b in opts.max_tokens.split(",") if b]
    bs = int(opts.batch_sizes.split(",")[0])
    if budgets:
        result["token_budgets"] = {}
        print(f"\n{'max_tokens':>10} {'batch':>6} {'examples/s':>11} {'peak MiB':>9} {'max rel diff':>13}")
    for budget in budgets:
        t = time.perf_counter()
        rows, peak = peak_memory(lambda budget=budget: score_samples(model, samples, danger, safety, batch_size=bs,
                                                       max_tokens=budget, progress=False), device)
        rate = len(samples) / (time.perf_counter() - t)  # profiled: slower than the timings above
        err = rel_err([r["sqsd"] for r in rows[:opts.loop_examples]], [r["sqsd"] for r in loop_rows])
        result["token_budgets"][str(budget)] = {"examples_per_s_profiled": rate, "peak_mib": peak,
                                                "max_rel_diff_vs_loop": err}
        print(f"{str(budget):>10} {bs:>6} {rate:>11.2f} {peak:>9.0f} {err:>13.2e}")
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {opts.out}")


def peak_memory(run, device: str):
    """(run()'s result, its peak memory in MiB above the start)."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = run()
        return out, (torch.cuda.max_memory_allocated() - start) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run()
    return out, allocation_peak(prof.events()) / 2**20


if __name__ == "__main__":
    main()
