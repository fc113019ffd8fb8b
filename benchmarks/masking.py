"""Step time and peak memory of the WaRP-masked step against the plain step, side by side.

A 4-layer SmolLM2-135M-shaped Llama (random weights), LoRA r=16 on every linear layer (or full fine-tuning of the
MLPs with ``--full-ft``), batches of random tokens, trained in rounds that alternate the variants in one process:
``plain`` (no callback) and ``mask`` (``SQSDCallback(mask=...)`` alone, every trained module masked). Each round's
first step is a warm-up and is dropped; the rest give medians and per-round ratios. The mask's one-off build (two
passes over the safety records, one eigendecomposition per distinct module input) is timed on its own. Memory: the
peak of PyTorch's CPU allocations during steps 2-3 above where step 2 began (model, optimizer state and U_M
resident; overhead.py's ``allocation_peak``), one run per variant in its own process, and U_M's own size.

    python benchmarks/masking.py                  # LoRA -> benchmarks/results/masking-cpu.json
    python benchmarks/masking.py --full-ft        # full fine-tuning of the MLPs
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from overhead import allocation_peak  # benchmarks/ is this script's folder
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from sqsd_callback import SQSDCallback
from sqsd_callback.policies import SafetyMask
from sqsd_lab.tiny import ALL_LINEAR, SMOLLM2_135M, pad_collator


class ProfileSteps(TrainerCallback):
    """PyTorch's CPU allocations from step 2's start to step 3's end."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            self.prof.__exit__(None, None, None)


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (on_step_begin to on_step_end; last in the list, so callback work counts)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


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


def run(opts, variant: str, steps: int, *extra: TrainerCallback) -> tuple[list[float], float]:
    """One run of ``steps`` steps; its step times and the mask's build time (0 for plain)."""
    model = model_of(opts)
    timer, build = StepTimer(), [0.0]
    callbacks = list(extra)
    if variant == "mask":
        original = SafetyMask.build

        def timed(self, model):
            t = time.perf_counter()
            out = original(self, model)
            build[0] = time.perf_counter() - t
            kept.update({m: tuple(u.shape) for m, u in out.items()})
            return out
        SafetyMask.build = timed
        callbacks.append(SQSDCallback(mask=records(opts.safety, opts.seq, 1), mask_keep=opts.keep))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=opts.batch, max_steps=steps,
                                 report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1,
                                 learning_rate=1e-4)
        Trainer(model=model, args=args, train_dataset=Dataset.from_list(records(opts.batch * steps, opts.seq, 2)),
                data_collator=pad_collator(), callbacks=[*callbacks, timer]).train()
    if variant == "mask":
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
    p.add_argument("--peak", choices=["plain", "mask"], help=argparse.SUPPRESS)  # one variant's memory, then exit
    p.add_argument("--out", default=None)
    opts = p.parse_args()
    if opts.peak:
        profile = ProfileSteps()
        run(opts, opts.peak, 3, profile)
        print(allocation_peak(profile.prof.events()) / 2**20)
        return
    times = {"plain": [], "mask": []}
    ratios, builds = [], []
    for _ in range(opts.rounds):
        plain, _ = run(opts, "plain", opts.steps)
        mask, build = run(opts, "mask", opts.steps)
        times["plain"] += plain
        times["mask"] += mask
        builds.append(build)
        ratios.append(statistics.median(mask) / statistics.median(plain))
    argv = [sys.executable, __file__, *sys.argv[1:]]
    step_peak = {v: float(subprocess.run([*argv, "--peak", v], capture_output=True, text=True, check=True)
                     .stdout.split()[-1]) for v in times}
    result = {
        "setup": {"model": f"SmolLM2-135M shape, {opts.layers} layers, random weights",
                  "training": "full fine-tuning of the MLPs" if opts.full_ft else "LoRA r=16 on every linear layer",
                  "batch": opts.batch, "seq": opts.seq, "safety_records": opts.safety, "mask_keep": opts.keep,
                  "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                  "torch": torch.__version__},
        "step_s_median": {v: statistics.median(t) for v, t in times.items()},
        "mask_over_plain": statistics.median(ratios), "round_ratios": ratios,
        "mask_build_s": statistics.median(builds),
        "step_peak_alloc_mib": step_peak,
        "protected_directions": {"modules": len(kept), "mean_k": statistics.mean(k for _, k in kept.values()),
                                 "max_k": max(k for _, k in kept.values()),
                                 "U_M_mib": sum(i * k * 4 for i, k in kept.values()) / 2**20},
    }
    out = Path(opts.out or Path(__file__).parent / "results" / f"masking{'-fullft' if opts.full_ft else ''}-cpu.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
