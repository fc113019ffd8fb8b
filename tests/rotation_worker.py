"""The run of tests/test_rotation.py: 4 steps of the tiny LoRA model with robust z-score drops that exclude an
example dropped before and a drift stop that keeps the last safe adapter (it never fires), a checkpoint every step
and save_total_limit=1. Run as a script it is killed (SIGKILL) inside the monitor's state write for checkpoint-2,
where SQSD_KILL says, after the Trainer has already deleted checkpoint-1:

    SQSD_KILL=checkpoint|torn|latest python tests/rotation_worker.py OUT
"""

import copy
import os
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

from sqsd_callback import SQSDCallback
from sqsd_callback.runtime.checkpoint import LATEST_FILE, STATE_FILE
from sqsd_lab.tiny import random_samples, three_sets, tiny_lora

from helpers import trainer

STEPS, KILLED = 4, 2
OPTIONS = dict(drop_zscore_above=0.5, drop_zscore_robust=True, drop_min_history=4, exclude_dropped=True,
               stop_drift_above=10.0, save_last_safe=True)


class StateAt(TrainerCallback):
    """The monitor's state (``Run.state``: tensors, meta) at train begin and after each save, by step; placed after
    the SQSDCallback ``cb`` in the Trainer's list."""

    def __init__(self, cb: SQSDCallback) -> None:
        self.cb, self.states = cb, {}

    def on_train_begin(self, args, state, control, **kwargs):
        self._record(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self._record(state.global_step)

    def _record(self, step: int) -> None:
        tensors, meta = self.cb.run.state(self.cb.policies)  # copies: the meta holds the run's own lists
        self.states[step] = {k: v.clone() for k, v in tensors.items()}, copy.deepcopy(meta)


def train(out: Path, resume=None):
    """(trainer, callback, the monitor's state by step) of the run in ``out``."""
    model = tiny_lora("llama")
    cb = SQSDCallback(*three_sets(model), **OPTIONS)
    states = StateAt(cb)
    run = trainer(model, random_samples(16, seed=12), out, [cb, states], steps=STEPS, save_strategy="steps",
                  save_steps=1, save_total_limit=1)
    run.train(resume_from_checkpoint=resume)
    return run, cb, states.states


def kill_inside_the_state_write(out: Path, where: str) -> None:
    """SIGKILL this process inside the monitor's state write for checkpoint-KILLED: ``checkpoint`` at the rename
    that would put the checkpoint's copy in place, ``torn`` there after leaving half a file in its place (as a
    filesystem that lost the rename's ordering would), ``latest`` at the rename of the latest state, before the
    checkpoint's copy is begun."""
    ckpt, latest = out / f"checkpoint-{KILLED}" / STATE_FILE, out / "sqsd" / LATEST_FILE
    replace = os.replace

    def killing(src, dst, *args, **kwargs):
        if Path(dst) == ckpt and where in ("checkpoint", "torn"):
            if where == "torn":
                data = Path(src).read_bytes()
                ckpt.write_bytes(data[:len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        if Path(dst) == latest and where == "latest" and ckpt.parent.is_dir():
            os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst, *args, **kwargs)

    os.replace = killing


if __name__ == "__main__":
    out = Path(sys.argv[1])
    kill_inside_the_state_write(out, os.environ["SQSD_KILL"])
    train(out)
    sys.exit("not killed")
