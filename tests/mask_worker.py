"""One rank of the 2-process CPU (gloo) DDP test of the safety mask: trains the tiny LoRA model with the mask (and
with drops too), accumulation 2 and clipping active; rank 0 keeps θ at every step, the mask's basis and the
logged share removed.

    torchrun --nproc_per_node 2 tests/mask_worker.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed

from sqsd_callback import SQSDCallback
from sqsd_lab.tiny import random_samples, three_sets, tiny_lora

from helpers import ThetaEachStep, finish_worker, trainer

SAMPLES = random_samples(24, seed=3)
SAFETY = random_samples(6, seed=9)
TRAIN = dict(accum=2, steps=3, max_grad_norm=0.05, adam_epsilon=1e-6)  # clipping active; eps as in ddp_worker.py


def run_options() -> dict[str, dict]:
    """The runs: name -> SQSDCallback options."""
    return {"mask": dict(mask=SAFETY, mask_keep=0.5), "mask_drops": dict(mask=SAFETY, mask_keep=0.5,
                                                                           drop_top_fraction=0.25)}


def run(out: Path, name: str, options: dict) -> None:
    model = tiny_lora("llama")
    thetas = ThetaEachStep()
    cb = SQSDCallback(*three_sets(model), **options)
    run = trainer(model, SAMPLES, out / name, [cb, thetas], **TRAIN)
    run.train()
    if torch.distributed.get_rank() == 0:
        torch.save(thetas.theta, out / name / "thetas.pt")
        torch.save(cb.policies[-1].basis, out / name / "basis.pt")
        logged = [h["sqsd/mask_removed"] for h in run.state.log_history if "loss" in h]
        (out / name / "removed.json").write_text(json.dumps(logged))


if __name__ == "__main__":
    for name, options in run_options().items():
        run(Path(sys.argv[1]), name, options)
    finish_worker()
