"""Step time and peak memory of a LoRA SFT run with and without SQSDCallback, measured side by side.

The same TRL SFTTrainer run (SmolLM2-135M-sized Llama with random weights, LoRA r=16 on every linear layer or
full fine-tuning, a batch of random tokens, 2 danger + 1 safety direction sets) is trained in rounds that
alternate the variants in one process; each round's first step is a warm-up and is dropped, the rest give
medians (and per-round ratios, whose spread shows how steady the machine was). A profiled run of each engine gives
the time its per-step LoRA constants take (``sqsd::constants``: rebuilt every pass from the parameters it used, so
that no optimizer's in-place update can leave them stale), as a share of the plain step. Peak memory comes from
one short run per variant in its own process (CUDA: max allocated; CPU: the peak of PyTorch's allocations from the
model's creation to the run's end, direction sets included, from the profiler's memory events).

    python benchmarks/overhead.py                                  # LoRA: none vs hooks
    python benchmarks/overhead.py --full-ft --dir-rank 64          # full fine-tuning, rank-64 directions
    python benchmarks/overhead.py --full-ft --dir-rank 0           # full fine-tuning, full-rank directions
    python benchmarks/overhead.py --full-ft --dir-rank 64 --engines hooks,hooks:16   # + θ_0 kept at 1 entry in 16
    python benchmarks/overhead.py --shape narrow --seq 64          # per-operation overhead (GPU-like regime)
    python benchmarks/overhead.py --dir-dtype bfloat16             # direction sets held in bf16 (half the memory)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

from sqsd_callback import SQSDCallback
from sqsd_lab.tiny import ALL_LINEAR, SMOLLM2_135M, random_set, word_tokenizer

SHAPES = {
    "smollm2-135m": {},
    # every matrix small: kernels are cheap and per-operation overhead (Python, dispatch, on a GPU the kernel
    # launches) sets the step time, as it does for a small model on a GPU
    "narrow": dict(hidden_size=64, intermediate_size=192, num_attention_heads=2, num_key_value_heads=1,
                   vocab_size=2048),
}


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, from on_step_begin to on_step_end, callback work included when it comes
    last among the callbacks (the Trainer calls them in list order: one after it would do its on_step_end work,
    e.g. SQSDCallback's drift, outside the timed step)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def random_sets(model, rank: int | None, dtype: str = "float32") -> tuple[list, list]:
    """The benchmarks' direction sets: 2 danger + 1 safety random sets of ``rank`` (None: dense), fixed seeds, held
    in ``dtype``."""
    sets = [random_set(model, kind, name, rank=rank, seed=seed).to(dtype=getattr(torch, dtype))
            for kind, name, seed in (("danger", "d1", 1), ("danger", "d2", 2), ("safety", "s1", 3))]
    return sets[:2], sets[2:]


def token_rows(vocab: int, n: int, seq: int) -> list[dict]:
    """``n`` rows of ``seq`` random tokens (fixed seed), the first 32 not scored."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 32 + ids[32:]})
    return rows


def build(opts, variant: str | None, out_dir: str):
    """A trainer for one variant (None = no callback; ``engine`` or ``engine:drift_sample``); every variant starts
    from the same weights."""
    torch.manual_seed(0)
    config = {**SMOLLM2_135M, **SHAPES[opts.shape], "num_hidden_layers": opts.layers}
    model = LlamaForCausalLM(LlamaConfig(**config))
    if opts.full_ft:
        for name, p in model.named_parameters():
            p.requires_grad_(any(m in name for m in ALL_LINEAR))
    else:
        model = get_peft_model(model, LoraConfig(r=opts.rank, lora_alpha=2 * opts.rank, target_modules=ALL_LINEAR))
    rows = token_rows(config["vocab_size"], opts.batch * opts.steps_per_round, opts.seq)
    timer = StepTimer()
    callbacks = []
    if variant is not None:
        engine, _, sample = variant.partition(":")
        danger, safety = random_sets(model, opts.dir_rank or None, opts.dir_dtype)  # dir_rank 0: dense
        callbacks.append(SQSDCallback(danger=danger, safety=safety, engine=engine, drift_sample=int(sample or 1)))
    callbacks.append(timer)  # last: callbacks run in list order, so the step it times includes the others'
    args = SFTConfig(output_dir=out_dir, max_steps=opts.steps_per_round, per_device_train_batch_size=opts.batch,
                     logging_steps=opts.steps_per_round, report_to=[], save_strategy="no", bf16=opts.bf16,
                     gradient_checkpointing=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=word_tokenizer(config["vocab_size"]), callbacks=callbacks)
    return trainer, timer


def machine() -> dict:
    """What the numbers were measured on."""
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads()}


def peak_memory(opts, engine: str | None) -> float:
    """Peak memory (MiB) of a short run of one variant, in a fresh process."""
    cmd = [sys.executable, __file__, "--_memory-of", engine or "none", "--layers", str(opts.layers), "--batch",
           str(opts.batch), "--seq", str(opts.seq), "--shape", opts.shape, "--rank", str(opts.rank),
           "--dir-rank", str(opts.dir_rank), "--dir-dtype", opts.dir_dtype]
    cmd += ["--bf16"] * opts.bf16 + ["--full-ft"] * opts.full_ft
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def _memory_child(opts) -> None:
    engine = None if opts._memory_of == "none" else opts._memory_of
    opts.steps_per_round = 2
    with tempfile.TemporaryDirectory() as d:
        if torch.cuda.is_available():
            trainer, _ = build(opts, engine, d)
            torch.cuda.reset_peak_memory_stats()
            trainer.train()
            print(torch.cuda.max_memory_allocated() / 2**20)
            return
        # profiled from the model's creation on: tensors made before a profiled region are not seen to be freed in it
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer, _ = build(opts, engine, d)
            trainer.train()
    print(allocation_peak(prof.events()) / 2**20)


def allocation_peak(events) -> int:
    """Peak bytes of PyTorch's CPU allocations above where a profiled region started (the CPU counterpart of CUDA's
    max allocated; process RSS cannot see it under the allocator's caching). Each operator's own allocations count
    at its start, frees at their ``[memory]`` events."""
    changes = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                     for e in events)
    total = peak = 0
    for _, change in changes:
        total += change
        peak = max(peak, total)
    return peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="hooks", help="comma-separated engines to compare with no callback, each "
                   "optionally with a drift_sample (hooks:16)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps-per-round", type=int, default=3, help="the first step of each round is a warm-up")
    p.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    p.add_argument("--shape", choices=SHAPES, default="smollm2-135m",
                   help="layer widths: SmolLM2-135M's, or narrow ones where per-operation overhead dominates")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--full-ft", action="store_true", help="train every linear weight instead of LoRA")
    p.add_argument("--dir-rank", type=int, default=16, help="rank of the random directions (0: full rank)")
    p.add_argument("--dir-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype the direction sets are held in (DirectionSet.to): bf16 takes half the memory")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory runs")
    p.add_argument("--out", default="benchmarks/results/overhead.json")
    p.add_argument("--_memory-of", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    if opts._memory_of is not None:
        return _memory_child(opts)

    variants = [None, *opts.engines.split(",")]
    tmp = tempfile.TemporaryDirectory()
    built = {v: build(opts, v, f"{tmp.name}/{v}") for v in variants}
    times = {v: [] for v in variants}
    rounds = {v: [] for v in variants}  # each round's median: ratios within a round share the machine's state
    for r in range(opts.rounds):
        for v in variants:
            trainer, timer = built[v]
            timer.times = []
            trainer.train()
            times[v] += timer.times[1:]
            rounds[v].append(statistics.median(timer.times[1:]))
            print(f"round {r + 1}/{opts.rounds} {v or 'none':>6}: " + " ".join(f"{t:.3f}" for t in timer.times),
                  flush=True)
    median = {v or "none": statistics.median(ts) for v, ts in times.items()}
    constants = {v: region_seconds_per_step(built[v][0], "sqsd::constants", opts.steps_per_round)
                 for v in opts.engines.split(",")}
    memory = {} if opts.no_memory else {v or "none": peak_memory(opts, v) for v in variants}
    result = {
        "config": {k: v for k, v in vars(opts).items() if not k.startswith("_")},
        "machine": machine(),
        "step_time_s": {v or "none": ts for v, ts in times.items()},
        "median_step_time_s": median,
        "step_time_ratio": {v: median[v] / median["none"] for v in median if v != "none"},
        "round_ratios": {v: [a / b for a, b in zip(rounds[v], rounds[None])] for v in opts.engines.split(",")},
        "constants_s_per_step": constants,
        "constants_fraction_of_plain_step": {v: c / median["none"] for v, c in constants.items()},
        "peak_memory_mib": memory,
        "peak_memory_ratio": {v: memory[v] / memory["none"] for v in memory if v != "none"},
    }
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'variant':>8} {'median step (s)':>16} {'time ratio':>11} {'per round':>13} {'peak MiB':>10} "
          f"{'mem ratio':>10}")
    for v in median:
        spread = result["round_ratios"].get(v, [1.0])
        print(f"{v:>8} {median[v]:>16.3f} {result['step_time_ratio'].get(v, 1.0):>11.3f} "
              f"{min(spread):>6.3f}-{max(spread):<6.3f} {memory.get(v, float('nan')):>10.0f} "
              f"{result['peak_memory_ratio'].get(v, 1.0):>10.3f}")
    for v, c in constants.items():
        print(f"{v}: LoRA constants rebuilt every pass: {c * 1e3:.2f} ms/step, "
              f"{result['constants_fraction_of_plain_step'][v]:.2%} of the plain step")
    print(f"\nwrote {opts.out}")


def region_seconds_per_step(trainer, region: str, steps: int) -> float:
    """Time per optimizer step inside ``record_function(region)``, from one profiled run (device time on a GPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=activities) as prof:
        trainer.train()
    events = [e for e in prof.key_averages() if e.key == region]
    attr = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return sum(getattr(e, attr) for e in events) / 1e6 / steps


if __name__ == "__main__":
    main()
