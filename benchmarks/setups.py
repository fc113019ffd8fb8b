"""Step time of the monitor in the set-ups users run it in (QLoRA 4-bit and 8-bit, DDP, FSDP2, ZeRO-2, ZeRO-3), each
against the same set-up without the callback, measured side by side (alternating runs) and reported as ratios.

Every run trains a SmolLM2-135M-sized Llama (random weights, ``--layers`` layers) with LoRA r = 16 on every linear
layer through TRL's SFTTrainer and its default optimizer, on a batch of random tokens, with 2 danger + 1 safety
rank-16 sets; each run's first step is a warm-up and is dropped. The multi-process set-ups run as 2 processes;
on CPU they use gloo (DeepSpeed with ``DS_ACCELERATOR=cpu``, one thread per process). accelerate applies FSDP
only on accelerators, so on CPU the FSDP2 run sets accelerate's state to FSDP itself (as the tests do), and every
sharded run records whether the LoRA factors really were sharded, so that a ratio cannot silently be DDP's.
QLoRA runs in one process (bitsandbytes' CPU backend on CPU).

    python benchmarks/setups.py                                  # every set-up, 3 rounds
    python benchmarks/setups.py --setups qlora4 fsdp2 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SETUPS = ("qlora4", "qlora8", "ddp", "fsdp2", "zero2", "zero3")
MULTI_PROCESS = ("ddp", "fsdp2", "zero2", "zero3")


def _child(setup: str, variant: str, layers: int, batch: int, seq: int, steps: int, base_dir: Path,
           out: Path) -> None:
    """One run of one set-up (``variant``: "none" or "hooks"); rank 0 writes its step times and sharding."""
    from datasets import Dataset
    from overhead import StepTimer, random_sets, token_rows
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from sqsd_callback import SQSDCallback
    from sqsd_lab.tiny import ALL_LINEAR, SMOLLM2_135M, word_tokenizer

    config = {**SMOLLM2_135M, "num_hidden_layers": layers}
    if setup.startswith("qlora"):
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.float32) if setup == "qlora4" else \
            BitsAndBytesConfig(load_in_8bit=True)
        model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=torch.float32,
                                                     device_map="cuda" if torch.cuda.is_available() else "cpu")
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**config))
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LINEAR))
    rows = token_rows(config["vocab_size"], batch * steps * int(os.environ.get("WORLD_SIZE", "1")), seq)
    timer = StepTimer()
    callbacks = []
    if variant == "hooks":
        danger, safety = random_sets(model, 16)
        callbacks.append(SQSDCallback(danger=danger, safety=safety))
    callbacks.append(timer)  # last, so the step it times includes the callback's on_step_end
    extra = {}
    if setup == "fsdp2":
        extra = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                                     "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                                     "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    elif setup.startswith("zero"):
        # persistence threshold 0: without it ZeRO-3 keeps parameters under 1e5 entries (every LoRA factor) whole
        zero = {"stage": int(setup[-1]), **({"stage3_param_persistence_threshold": 0} if setup == "zero3" else {})}
        extra = dict(deepspeed={"zero_optimization": zero, "train_micro_batch_size_per_gpu":
                                "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                                "zero_force_ds_cpu_optimizer": False})
    args = SFTConfig(output_dir=str(out / "run"), max_steps=steps, per_device_train_batch_size=batch,
                     logging_steps=steps, report_to=[], save_strategy="no", gradient_checkpointing=True,
                     disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), **extra)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=word_tokenizer(config["vocab_size"]), callbacks=callbacks)
    if setup == "fsdp2" and not torch.cuda.is_available():  # the CPU adaptation (module docstring)
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
        state = trainer.accelerator.state
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate sets it for FSDP
        trainer.is_fsdp_enabled = True
    trainer.train()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]  # FSDP2 and ZeRO-3 shard them in place
    if setup == "fsdp2":
        from torch.distributed.tensor import DTensor
        sharded = all(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in lora)
    elif setup == "zero3":
        sharded = all(hasattr(p, "ds_id") and p.numel() == 0 for p in lora)
    else:
        sharded = None  # ZeRO-2 partitions optimizer state and gradients, not parameters; DDP and QLoRA replicate
    if int(os.environ.get("RANK", "0")) == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps({"times": timer.times[1:], "sharded": sharded}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run(opts, setup: str, variant: str, base_dir: Path, out: Path) -> dict:
    """One child run; its step times (warm-up dropped) and sharding."""
    args = [__file__, "--_child", setup, variant, "--layers", str(opts.layers), "--batch", str(opts.batch),
            "--seq", str(opts.seq), "--steps", str(opts.steps), "--_base", str(base_dir), "--_out", str(out)]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if setup in MULTI_PROCESS:
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port), *args]
        if not torch.cuda.is_available():
            env.update(OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // 2)), DS_ACCELERATOR="cpu")
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{setup}/{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "result.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="per process")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="per run; the first is a warm-up")
    p.add_argument("--out", default="benchmarks/results/setups-cpu.json")
    p.add_argument("--_child", nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_base", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts._child is not None:
        return _child(*opts._child, opts.layers, opts.batch, opts.seq, opts.steps, Path(opts._base), Path(opts._out))

    from overhead import machine
    from transformers import LlamaConfig, LlamaForCausalLM

    from sqsd_lab.tiny import SMOLLM2_135M

    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)  # QLoRA quantizes the same weights the other set-ups train on
    LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": opts.layers})).save_pretrained(tmp / "base")
    result = {"config": {k: v for k, v in vars(opts).items() if not k.startswith("_")}, "machine": machine(),
              "setups": {}}
    for setup in opts.setups:
        times = {"none": [], "hooks": []}
        rounds, sharded = [], None
        for r in range(opts.rounds):
            medians = {}
            for variant in times:
                got = run(opts, setup, variant, tmp / "base", tmp / f"{setup}-{variant}-{r}")
                times[variant] += got["times"]
                medians[variant] = statistics.median(got["times"])
                sharded = got["sharded"] if sharded is None else sharded and got["sharded"]
            rounds.append(medians["hooks"] / medians["none"])
            print(f"{setup} round {r + 1}/{opts.rounds}: none {medians['none']:.3f} s, hooks "
                  f"{medians['hooks']:.3f} s ({rounds[-1]:.3f}x)", flush=True)
        median = {v: statistics.median(ts) for v, ts in times.items()}
        result["setups"][setup] = {"step_time_s": times, "median_step_time_s": median,
                                   "step_time_ratio": median["hooks"] / median["none"], "round_ratios": rounds,
                                   "parameters_sharded": sharded}
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'set-up':>8} {'plain step (s)':>15} {'ratio':>7} {'per round':>13} {'sharded':>8}")
    for setup, r in result["setups"].items():
        print(f"{setup:>8} {r['median_step_time_s']['none']:>15.3f} {r['step_time_ratio']:>7.3f} "
              f"{min(r['round_ratios']):>6.3f}-{max(r['round_ratios']):<6.3f} {str(r['parameters_sharded']):>8}")
    print(f"\nwrote {opts.out}")


if __name__ == "__main__":
    main()
