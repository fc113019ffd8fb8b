"""Step time and peak memory of each protection policy against the plain step, side by side.

A SmolLM2-135M-shaped Llama (random weights, 4 layers by default), LoRA r=16 on every linear layer (or full
fine-tuning of the MLPs with ``--full-ft``), batches of random tokens, trained in rounds that run every variant once
in one process: ``plain`` (no callback), ``monitor`` (scoring alone: 2 danger + 1 safety random sets of rank 16),
``drops`` (the monitor dropping its top quarter of every micro-batch: the drop path taken at every step, its worst
case), ``anchor`` (the monitor with the AsFT anchor on a rank-16 aligned set; LoRA only), ``mask`` (the WaRP mask
alone, every trained module masked) and ``mask+drops``. Each round's first step is a warm-up and is dropped; the
rest give medians, and each round's median over plain's gives the per-round ratios whose spread shows how steady the
machine was. The mask's one-off build (two passes over the safety records, one eigendecomposition per distinct module
input) is timed on its own. Memory, each from a short run of one variant in its own process, by overhead.py's
``allocation_peak`` (PyTorch's CPU allocations): the run's peak from the model's creation on (direction sets, U_M and
the mask's build included), and the steps' peak, during steps 2-3 above where step 2 began (what a step adds on top
of what stays resident).

    python benchmarks/policies.py              # LoRA -> benchmarks/results/policies-cpu.json
    python benchmarks/policies.py --full-ft    # full fine-tuning of the MLPs -> policies-fullft-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from overhead import StepTimer, allocation_peak, machine, random_sets  # benchmarks/ is this script's folder
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from sqsd_callback import SQSDCallback
from sqsd_callback.policies import SafetyMask
from sqsd_lab.tiny import ALL_LINEAR, SMOLLM2_135M, pad_collator, random_set

VARIANTS = ("plain", "monitor", "drops", "anchor", "mask", "mask+drops")


class ProfileSteps(TrainerCallback):
    """PyTorch's CPU allocations from step 2's start to step 3's end."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            self.prof.__exit__(None, None, None)


def model_of(opts):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": opts.layers}))
    if opts.full_ft:
        for n, p in model.named_parameters():
            p.requires_grad = "mlp" in n
        return model
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR))


def records(n: int, length: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, SMOLLM2_135M["vocab_size"], (length,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * length,
                    "labels": [-100] * (length // 2) + ids[length // 2:]})
    return out


kept: dict[str, tuple[int, int]] = {}
"""Protected directions per module, from the last mask built."""


def callback(opts, variant: str, model) -> SQSDCallback | None:
    """The variant's SQSDCallback (None: the plain step)."""
    if variant == "plain":
        return None
    options: dict = {}
    if variant != "mask":
        options["danger"], options["safety"] = random_sets(model, 16)
    if "drops" in variant:
        options["drop_top_fraction"] = 0.25
    if variant == "anchor":
        options["anchor"] = random_set(model, "safety", "aligned", rank=16, seed=4)
    if "mask" in variant:
        options.update(mask=records(opts.safety, opts.seq, 1), mask_keep=opts.keep)
    return SQSDCallback(**options)


def run(opts, variant: str, steps: int, *extra: TrainerCallback) -> tuple[list[float], float]:
    """One run of ``steps`` steps; its step times (warm-up dropped) and the mask's build time (0 without a mask)."""
    model = model_of(opts)
    timer, build = StepTimer(), [0.0]
    original = SafetyMask.build

    def timed(self, model):
        t = time.perf_counter()
        out = original(self, model)
        build[0] = time.perf_counter() - t
        kept.update({m: tuple(u.shape) for m, u in out.items()})
        return out
    SafetyMask.build = timed
    monitor = callback(opts, variant, model)
    try:
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(output_dir=out, per_device_train_batch_size=opts.batch, max_steps=steps,
                                     report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                                     logging_steps=1, learning_rate=1e-4)
            rows = Dataset.from_list(records(opts.batch * steps, opts.seq, 2))
            Trainer(model=model, args=args, train_dataset=rows, data_collator=pad_collator(),
                    callbacks=[*extra, *([monitor] if monitor else []), timer]).train()
    finally:
        SafetyMask.build = original
    return timer.times[1:], build[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--safety", type=int, default=16, help="safety records the mask is built from")
    p.add_argument("--keep", type=float, default=0.9, help="mask_keep")
    p.add_argument("--full-ft", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="steps per round (the first is a warm-up)")
    p.add_argument("--peak", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant's memory, then exit
    p.add_argument("--peak-scope", choices=["run", "steps"], default="steps", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    opts = p.parse_args()
    variants = [v for v in VARIANTS if not (opts.full_ft and v == "anchor")]  # the anchor is LoRA's
    if opts.peak and opts.peak_scope == "steps":
        profile = ProfileSteps()
        run(opts, opts.peak, 3, profile)
        print(allocation_peak(profile.prof.events()) / 2**20)
        return
    if opts.peak:  # profiled from the model's creation: tensors made before a profiled region are not seen freed
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            run(opts, opts.peak, 3)
        print(allocation_peak(prof.events()) / 2**20)
        return
    times: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in variants if v != "plain"}
    builds = []
    for _ in range(opts.rounds):
        medians = {}
        for v in variants:
            t, build = run(opts, v, opts.steps)
            times[v] += t
            medians[v] = statistics.median(t)
            if v == "mask":
                builds.append(build)
        for v in ratios:
            ratios[v].append(medians[v] / medians["plain"])
    argv = [sys.executable, __file__, *sys.argv[1:]]
    peak = {scope: {v: float(subprocess.run([*argv, "--peak", v, "--peak-scope", scope], capture_output=True,
                                             text=True, check=True).stdout.split()[-1]) for v in variants}
            for scope in ("run", "steps")}
    result = {
        "setup": {"model": f"SmolLM2-135M shape, {opts.layers} layers, random weights",
                  "training": "full fine-tuning of the MLPs" if opts.full_ft else "LoRA r=16 on every linear layer",
                  "batch": opts.batch, "seq": opts.seq, "direction_sets": "2 danger + 1 safety, rank 16",
                  "drops": "top quarter of every micro-batch", "anchor": "rank-16 aligned set, λ 1",
                  "safety_records": opts.safety, "mask_keep": opts.keep, "rounds": opts.rounds,
                  "steps_per_round": opts.steps, **machine()},
        "step_s_median": {v: statistics.median(t) for v, t in times.items()},
        "over_plain": {v: statistics.median(r) for v, r in ratios.items()},
        "round_ratios": ratios,
        "mask_build_s": statistics.median(builds),
        "run_peak_alloc_mib": peak["run"],
        "step_peak_alloc_mib": peak["steps"],
        "protected_directions": {"modules": len(kept), "mean_k": statistics.mean(k for _, k in kept.values()),
                                 "max_k": max(k for _, k in kept.values()),
                                 "U_M_mib": sum(i * k * 4 for i, k in kept.values()) / 2**20},
    }
    out = Path(opts.out or Path(__file__).parent / "results" / f"policies{'-fullft' if opts.full_ft else ''}-cpu.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    for v in variants:
        ratio = f"{result['over_plain'][v]:.2f}× plain" if v != "plain" else ""
        print(f"{v:>11}: {result['step_s_median'][v]:.3f} s/step {ratio:>13}  peak {peak['run'][v]:.0f} MiB "
              f"(steps {peak['steps'][v]:.0f} MiB)")
    print(f"mask build {result['mask_build_s']:.1f} s; results: {out}")


if __name__ == "__main__":
    main()
