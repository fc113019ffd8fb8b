"""One rank of the 2-process CPU (gloo) DDP resume test: an uninterrupted run (OUT/whole), a run killed at the end
of step CRASH (OUT/b, checkpoints every 2 steps) and its resume from its last checkpoint with a new model, callback
and Trainer (in the same processes: one launch keeps the test short). Two epochs of robust z-score drops that
exclude an example dropped before (accumulation 2, the default optimizer, clipping active); rank 0 keeps θ after
every step of each run in thetas-<run>.pt.

    torchrun --nproc_per_node 2 tests/ddp_resume_worker.py OUT
"""

import sys
from pathlib import Path

import torch
import torch.distributed

from sqsd_callback import SQSDCallback
from sqsd_lab.tiny import random_samples, three_sets, tiny_lora

from helpers import CrashAt, ThetaEachStep, finish_worker, trainer

SAMPLES = random_samples(24, seed=3)
STEPS_PER_EPOCH = 3  # 24 examples / (2 ranks × 2 per micro-batch × 2 micro-batches)
EPOCHS = 2
CRASH = 5  # killed at the end of step 5: resumed from checkpoint-4, in the second epoch
OPTIONS = dict(drop_zscore_above=0.5, drop_zscore_robust=True, drop_min_history=12, exclude_dropped=True)
TRAIN = dict(batch=2, accum=2, steps=-1, num_train_epochs=EPOCHS, adam_epsilon=1e-6, max_grad_norm=0.05)


def run(out: Path, name: str, crash: int | None = None, resume=None) -> None:
    """Train the run ``name`` (its files in OUT/whole, or OUT/b for the crashed and resumed runs)."""
    model = tiny_lora("llama")
    thetas = ThetaEachStep()
    callbacks = [SQSDCallback(*three_sets(model), **OPTIONS), thetas, *([CrashAt(crash)] if crash else [])]
    try:
        saves = dict(save_strategy="no") if name == "whole" else dict(save_strategy="steps", save_steps=2)
        trainer(model, SAMPLES, out / ("whole" if name == "whole" else "b"), callbacks, **TRAIN, **saves).train(
            resume_from_checkpoint=resume)
    except RuntimeError as err:
        if crash is None or "simulated crash" not in str(err):
            raise
    if torch.distributed.get_rank() == 0:
        torch.save(thetas.theta, out / f"thetas-{name}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    run(out, "whole")
    run(out, "crashed", crash=CRASH)
    if torch.distributed.get_rank() == 0:  # what the killed run left, for the test
        (out / "crashed-rows.jsonl").write_bytes((out / "b" / "sqsd" / "scores.jsonl").read_bytes())
    run(out, "resumed", resume=True)
    finish_worker()
