"""One rank of the 2-process DeepSpeed tests on CPU (``DS_ACCELERATOR=cpu``, gloo): the tiny LoRA model trained
through the Trainer under ZeRO-1, -2 and -3, one launch for all, with the monitor and a drift stop that saves the
last safe adapter; rank 0 keeps θ at every step (gathered) and whether the LoRA factors were really partitioned.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/deepspeed_worker.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed
from transformers import TrainerCallback

from sqsd_callback import SQSDCallback
from sqsd_lab.tiny import random_samples, three_sets, tiny_lora

from helpers import ThetaEachStep, finish_worker, trainer

SAMPLES = random_samples(24, seed=3)
STAGES = (1, 2, 3)
STOP = dict(stop_drift_above=-1e9, stop_patience=3, save_last_safe=True)  # stops after step 3; θ_0 the last safe
STEPS = STOP["stop_patience"]


class Partitioned(TrainerCallback):
    """Whether every LoRA factor is partitioned (empty on this rank) as each optimizer step begins, that is while
    training and outside any gather of the monitor's."""

    def __init__(self, model) -> None:
        self.lora, self.seen = [p for n, p in model.named_parameters() if "lora_" in n], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.seen.append(all(hasattr(p, "ds_id") and p.numel() == 0 for p in self.lora))


def run(out: Path, stage: int) -> None:
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    thetas = ThetaEachStep()
    # persistence threshold 0: ZeRO-3 otherwise keeps parameters under 1e5 entries (every LoRA factor here) whole
    config = {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "zero_force_ds_cpu_optimizer": False}  # keep the Trainer's default optimizer (fused AdamW)
    partitioned = Partitioned(model)
    trainer(model, SAMPLES, out / f"zero{stage}", [SQSDCallback(danger, safety, **STOP), thetas, partitioned],
            accum=2, steps=10, deepspeed=config).train()
    if torch.distributed.get_rank() == 0:
        torch.save(thetas.theta, out / f"zero{stage}" / "thetas.pt")
        (out / f"zero{stage}" / "sharding.json").write_text(json.dumps({"partitioned": all(partitioned.seen)}))


if __name__ == "__main__":
    for stage in STAGES:
        run(Path(sys.argv[1]), stage)
    finish_worker()
