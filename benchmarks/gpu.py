"""The GPU numbers in one run: step-time and memory overhead of SQSDCallback in LoRA and full fine-tuning, offline
throughput against the batch-size-1 loop, and every-step agreement with the loop, on whatever accelerator is
there, in a few minutes and without a model hub.

The model is Qwen2.5-0.5B's (or -1.5B's) configuration with random weights, in bf16 with PyTorch's SDPA attention
(its flash kernels on a GPU that has them), LoRA r=16 on every linear layer or full fine-tuning of them, batches of
random tokens, 2 danger + 1 safety random direction sets of rank 16. Only torch, transformers, peft and accelerate
are imported (no TRL, no datasets), so it runs in a stock PyTorch image. Each section is skipped, and says so, once
``--budget-s`` is spent.

- ``agreement``: a 3-step LoRA run (the Trainer's default optimizer, fused AdamW on CUDA; bf16 autocast;
  accumulation 2), each row of scores.jsonl against the batch-size-1 loop at the parameters its step used, under
  the same autocast and in fp32 (the bf16 noise floor);
- ``lora`` / ``full_ft``: median step time of the plain step, the monitor and the monitor with the recommended drops,
  alternated in rounds in one process (ratios within a round share the machine's state), and each variant's peak
  memory in a fresh process;
- ``offline``: examples/s of ``score_samples`` (hooks engine, batch 16) against the loop, and their largest
  disagreement.

    python benchmarks/gpu.py                      # Qwen2.5-0.5B-sized; writes benchmarks/results/gpu-<device>.json
    python benchmarks/gpu.py --size 1.5b
    python benchmarks/gpu.py --size smoke         # a tiny model, on CPU too: checks that the script runs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainerCallback, TrainingArguments

from sqsd_callback import SQSDCallback, score_samples
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.tiny import ALL_LINEAR, pad_collator, random_set, rel_err, score_err

SIZES = {  # Qwen2ForCausalLM arguments: the released models' shapes (random weights)
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}
DROPS = dict(drop_zscore_above=3.0, drop_zscore_robust=True, drop_min_history=8, exclude_dropped=True)
"""The recommended drops (docs/thresholds.md)."""
VARIANTS = {"none": None, "monitor": {}, "drops": DROPS}
KEYS = ("danger", "safety", "sqsd", "danger/d1", "danger/d2", "safety/s1")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(opts, full_ft: bool, seed: int = 0):
    """The sized model on the device: bf16 weights on CUDA (fp32 on CPU), SDPA attention; LoRA (fp32 factors,
    B nonzero so the first step's scores are not all at B = 0) or full fine-tuning of every linear layer's weight
    (Qwen2's q/k/v biases frozen: exact drops refuse a run that trains parameters they do not score)."""
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device() == "cuda" else torch.float32
    config = Qwen2Config(**SIZES[opts.size], attn_implementation="sdpa")
    with torch.device(device()):
        model = Qwen2ForCausalLM(config).to(dtype)
    if full_ft:
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".weight") and any(f".{m}." in name for m in ALL_LINEAR))
        return model
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model


def direction_sets(model) -> tuple[list, list]:
    sets = [random_set(model, kind, name, rank=16, seed=seed)
            for kind, name, seed in (("danger", "d1", 1), ("danger", "d2", 2), ("safety", "s1", 3))]
    return sets[:2], sets[2:]


def token_rows(opts, n: int, seq: int, seed: int = 1) -> list[dict]:
    """``n`` rows of random tokens, lengths in [seq/2, seq], the first quarter not scored (``index``: for
    score_samples; the Trainer's rows go without it)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(seq // 2, seq + 1, (1,), generator=g))
        ids = torch.randint(3, SIZES[opts.size]["vocab_size"], (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 4) + ids[length // 4:],
                     "attention_mask": [1] * length, "index": i})
    return rows


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (last among the callbacks, so the others' step work is inside it)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        sync()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        self.times.append(time.perf_counter() - self._t)


class ThetaEachStep(TrainerCallback):
    """θ_s, the trained parameters optimizer step s starts from, on the CPU."""

    def __init__(self) -> None:
        self.theta: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._keep(state.global_step, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._keep(state.global_step, model)

    def _keep(self, step: int, model) -> None:
        self.theta[step] = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                            if p.requires_grad}


def trainer(model, rows, out: str, callbacks, steps: int, batch: int, accum: int = 1) -> Trainer:
    """The Trainer's defaults (its default optimizer: fused AdamW on CUDA), bf16 autocast on CUDA."""
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                             max_steps=steps, learning_rate=1e-4, bf16=device() == "cuda", use_cpu=device() == "cpu",
                             logging_steps=steps, report_to=[], save_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0, remove_unused_columns=False)
    return Trainer(model=model, args=args, train_dataset=rows, data_collator=pad_collator(), callbacks=callbacks)


def untagged(rows: list[dict]) -> list[dict]:
    """Rows as the Trainer takes them (no ``index``: the model's forward has no such argument)."""
    return [{k: v for k, v in r.items() if k != "index"} for r in rows]


def at(model, theta: dict[str, torch.Tensor]):
    """``model`` with its trained parameters set to ``theta``."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in theta:
                p.copy_(theta[n].to(p.dtype))
    return model


# ---------------------------------------------------------------------------------------------------- sections
def agreement(opts) -> dict:
    """Every row of a 3-step LoRA run against the loop at its step's θ: under the run's bf16 autocast and in fp32."""
    steps, batch, accum = 3, 4, 2
    model = build_model(opts, full_ft=False)
    danger, safety = direction_sets(model)
    rows = token_rows(opts, steps * batch * accum, opts.seq, seed=7)
    thetas = ThetaEachStep()
    exact = copy.deepcopy(model).float()  # the fp32 reference: the same weights, no bf16 anywhere
    with tempfile.TemporaryDirectory() as d:
        trainer(model, untagged(rows), d, [SQSDCallback(danger, safety), thetas], steps, batch, accum).train()
        got = read_jsonl(Path(d) / "sqsd" / "scores.jsonl")
    per_step = []
    for s in range(steps):
        step_rows = [r for r in got if r["step"] == s]
        subset = [rows[r["index"]] for r in step_rows]
        with torch.autocast(device(), dtype=torch.bfloat16, enabled=device() == "cuda"):
            same = score_samples(at(model, thetas.theta[s]), subset, danger, safety, engine="loop", progress=False)
        fp32 = score_samples(at(exact, thetas.theta[s]), subset, danger, safety, engine="loop", progress=False)
        per_step.append({"step": s, "rows": len(step_rows),
                         "max_err_vs_loop_same_autocast": max(score_err(step_rows, same, k) for k in KEYS),
                         "max_err_vs_loop_fp32": max(score_err(step_rows, fp32, k) for k in KEYS)})
    return {"steps": per_step, "tolerance_note": "score_err: |row − loop| over the key's scale (sqsd_lab.tiny)",
            "batch": batch, "accumulation": accum, "seq_max": opts.seq}


def step_times(opts, full_ft: bool) -> dict:
    """Median step time per variant, alternated in rounds; peak memory per variant in a fresh process."""
    rows = untagged(token_rows(opts, opts.batch * opts.steps, opts.seq))
    built, times, rounds = {}, {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}
    tmp = tempfile.TemporaryDirectory()
    for v, options in VARIANTS.items():
        model = build_model(opts, full_ft)
        timer = StepTimer()
        callbacks = [] if options is None else [SQSDCallback(*direction_sets(model), **options)]
        built[v] = (trainer(model, rows, f"{tmp.name}/{v}", [*callbacks, timer], opts.steps, opts.batch), timer)
    for _ in range(opts.rounds):
        for v, (run, timer) in built.items():
            timer.times = []
            run.train()
            times[v] += timer.times[1:]  # the first step of a round warms up
            rounds[v].append(statistics.median(timer.times[1:]))
    median = {v: statistics.median(ts) for v, ts in times.items()}
    memory = {v: peak_memory(opts, full_ft, v) for v in VARIANTS}
    return {"median_step_s": median,
            "step_time_ratio": {v: median[v] / median["none"] for v in VARIANTS if v != "none"},
            "round_ratios": {v: [a / b for a, b in zip(rounds[v], rounds["none"])] for v in VARIANTS if v != "none"},
            "peak_memory_mib": memory,
            "peak_memory_ratio": {v: memory[v] / memory["none"] for v in VARIANTS if v != "none" and memory[v]},
            "tokens_per_step_max": opts.batch * opts.seq}


def peak_memory(opts, full_ft: bool, variant: str) -> float | None:
    """Peak device memory (MiB, max allocated) of a 3-step run of one variant in a fresh process; None on CPU."""
    if device() != "cuda":
        return None
    cmd = [sys.executable, __file__, "--size", opts.size, "--batch", str(opts.batch), "--seq", str(opts.seq),
           "--_memory-of", variant] + ["--_full-ft"] * full_ft
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def _memory_child(opts) -> None:
    model = build_model(opts, opts._full_ft)
    options = VARIANTS[opts._memory_of]
    callbacks = [] if options is None else [SQSDCallback(*direction_sets(model), **options)]
    with tempfile.TemporaryDirectory() as d:
        run = trainer(model, untagged(token_rows(opts, opts.batch * 3, opts.seq)), d, callbacks, 3, opts.batch)
        torch.cuda.reset_peak_memory_stats()
        run.train()
    print(torch.cuda.max_memory_allocated() / 2**20)


def offline(opts) -> dict:
    """score_samples' hooks engine (batch 16) against the loop (batch 1), same examples and parameters."""
    model = build_model(opts, full_ft=False)
    danger, safety = direction_sets(model)
    samples = token_rows(opts, opts.offline_examples, opts.seq, seed=3)
    loop_n = max(2, opts.offline_examples // 8)

    def rate(engine, batch_size, subset):
        score_samples(model, subset[:batch_size], danger, safety, engine=engine, batch_size=batch_size,
                      progress=False)  # warm-up
        sync()
        t = time.perf_counter()
        out = score_samples(model, subset, danger, safety, engine=engine, batch_size=batch_size, progress=False)
        sync()
        return out, len(subset) / (time.perf_counter() - t)

    loop_rows, loop_rate = rate("loop", 1, samples[:loop_n])
    hook_rows, hook_rate = rate("hooks", 16, samples)
    by_index = {r["index"]: r for r in hook_rows}
    err = max(rel_err([by_index[r["index"]][k] for r in loop_rows], [r[k] for r in loop_rows]) for k in KEYS)
    return {"loop_examples_per_s": loop_rate, "hooks_batch16_examples_per_s": hook_rate,
            "speedup": hook_rate / loop_rate, "max_rel_diff_vs_loop": err, "examples": len(samples),
            "loop_examples": loop_n}


def machine() -> dict:
    info = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "platform": platform.platform(),
            "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info.update(capability=".".join(map(str, torch.cuda.get_device_capability())),
                    memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
                    flash_sdp=torch.backends.cuda.flash_sdp_enabled())
    import peft
    import transformers
    info.update(transformers=transformers.__version__, peft=peft.__version__)
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="0.5b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024, help="longest example, in tokens (examples are 1/2 to 1 of it)")
    p.add_argument("--steps", type=int, default=6, help="steps per round (the first warms up)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--offline-examples", type=int, default=128)
    p.add_argument("--sections", default="agreement,lora,full_ft,offline")
    p.add_argument("--budget-s", type=float, default=420, help="sections that would start after this are skipped")
    p.add_argument("--out", default=None, help="default: benchmarks/results/gpu-<device>.json")
    p.add_argument("--_memory-of", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_full-ft", action="store_true", help=argparse.SUPPRESS)
    opts = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    if opts._memory_of is not None:
        return _memory_child(opts)
    info = machine()
    out = Path(opts.out or f"benchmarks/results/gpu-{re.sub(r'[^a-z0-9]+', '-', info['device'].lower())}.json")
    sections = {"agreement": agreement, "lora": lambda o: step_times(o, False),
                "full_ft": lambda o: step_times(o, True), "offline": offline}
    result = {"machine": info, "config": {k: v for k, v in vars(opts).items() if not k.startswith("_")}}
    start = time.perf_counter()
    for name in opts.sections.split(","):
        if time.perf_counter() - start > opts.budget_s:
            result[name] = {"skipped": f"the {opts.budget_s:.0f} s budget was spent"}
            continue
        t = time.perf_counter()
        result[name] = {**sections[name](opts), "section_s": time.perf_counter() - t}
        print(f"{name}: {json.dumps(result[name])}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))  # after each section: a killed run keeps what it measured
    print(summary(result))
    print(f"wrote {out}")


def summary(result: dict) -> str:
    """The numbers people look for, as a table."""
    lines = [f"device: {result['machine']['device']}", "| measure | value |", "|---|---|"]
    if "steps" in result.get("agreement", {}):
        a = result["agreement"]["steps"]
        lines.append(f"| agreement vs loop, same autocast (worst step) | "
                     f"{max(s['max_err_vs_loop_same_autocast'] for s in a):.2e} |")
        lines.append(f"| agreement vs loop, fp32 (worst step) | {max(s['max_err_vs_loop_fp32'] for s in a):.2e} |")
    for name in ("lora", "full_ft"):
        r = result.get(name, {})
        for v, ratio in r.get("step_time_ratio", {}).items():
            mem = r.get("peak_memory_ratio", {}).get(v)
            lines.append(f"| {name} {v}: step time × | {ratio:.3f} (memory × {mem:.3f}) |" if mem else
                         f"| {name} {v}: step time × | {ratio:.3f} |")
    if "speedup" in result.get("offline", {}):
        lines.append(f"| offline hooks (batch 16) vs loop | {result['offline']['speedup']:.1f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
