"""One rank of the 2-process CPU (gloo) DDP tests: trains the tiny LoRA model with SQSDCallback in each of the runs
below, one launch for all; rank 0 keeps θ at every step, every rank its drop policy's state.

    torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed

from sqsd_callback import SQSDCallback
from sqsd_callback.policies import DropPolicy
from sqsd_lab.tiny import random_samples, random_set, three_sets, tiny_lora

from helpers import ThetaEachStep, finish_worker, trainer

SAMPLES = random_samples(24, seed=3)
STEPS = 3
TRAIN = dict(accum=2, steps=STEPS, adam_epsilon=1e-6, max_grad_norm=0.05)  # clipping active
RUNS = {  # name: (callback options, trainer options)
    "monitor": (dict(metric="projection"), dict(gradient_checkpointing=True,  # non-reentrant, as transformers 5's
                                                 gradient_checkpointing_kwargs={"use_reentrant": False})),  # default
    "top_anchor": (dict(drop_top_fraction=0.5, anchor_lambda=0.5), {}),
    "zscore": (dict(drop_zscore_above=0.3, drop_min_history=4, exclude_dropped=True), {}),
    "above": (dict(drop_above=0.0), {}),
    # each rank's loss normalised by its own tokens: scores read each rank's own loss weights
    "local_tokens_monitor": (dict(metric="projection"), dict(average_tokens_across_devices=False)),
}
# each rank's loss normalised by its own tokens: a drop cannot be removed exactly after DDP has averaged the ranks
REFUSED = {"local_tokens": (dict(drop_top_fraction=0.5), dict(average_tokens_across_devices=False))}


def anchor_set(model):
    return random_set(model, "safety", "aligned", rank=2, seed=9)


def run(out: Path, name: str) -> None:
    options, extra = RUNS[name]
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    if "anchor_lambda" in options:
        options = dict(options, anchor=anchor_set(model))
    thetas = ThetaEachStep()
    cb = SQSDCallback(danger, safety, **options)
    trainer(model, SAMPLES, out / name, [cb, thetas], **TRAIN, **extra).train()
    rank = torch.distributed.get_rank()
    if rank == 0:
        torch.save(thetas.theta, out / name / "thetas.pt")
    drop = next((p for p in cb.policies if p.name == "drop"), DropPolicy())  # a run without drops: the empty state
    (out / name / f"drop-rank{rank}.json").write_text(json.dumps(drop.state_dict()))


def refused(out: Path, name: str) -> None:
    """A run that must stop before its first optimizer step: each rank writes the error and whether θ moved."""
    options, extra = REFUSED[name]
    model = tiny_lora("llama")
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    try:
        trainer(model, SAMPLES, out / name, [SQSDCallback(*three_sets(model), **options)], **TRAIN, **extra).train()
        error = None
    except RuntimeError as err:
        error = str(err)
    moved = any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)
    (out / name / f"refused-rank{torch.distributed.get_rank()}.json").write_text(json.dumps(
        {"error": error, "moved": moved}))


if __name__ == "__main__":
    for name in RUNS:
        run(Path(sys.argv[1]), name)
    for name in REFUSED:
        refused(Path(sys.argv[1]), name)
    finish_worker()
