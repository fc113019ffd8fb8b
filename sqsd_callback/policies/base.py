"""The Policy protocol: what the monitor does with scores and drift. The callback calls every policy's hooks in
order at fixed points of the step; a policy acts through them (edits of the step's gradients, the stop) and
describes and checkpoints itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..engines.base import StepEngine
    from ..runtime.distributed import Processes
    from ..runtime.recorder import MicroBatch
    from ..runtime.run_folder import RunFolder
    from ..types import Target


@dataclass
class RunContext:
    """What a policy may use during a run, handed to ``bind`` at train begin: the model, its scored layers and
    trained parameters, the processes, the in-step engine (None without direction sets or with an oracle engine),
    the run's folder, and whether the run starts at step 0 (False when it resumes)."""

    model: nn.Module
    targets: dict[str, Target]
    params: list[torch.Tensor]
    procs: Processes
    engine: StepEngine | None
    folder: RunFolder
    fresh: bool


class Policy:
    """A policy of the monitor. Each hook does nothing unless the policy overrides it.

    ``edits_gradients``: it changes the step's update (set-ups that cannot edit gradients exactly refuse it);
    ``needs_rows``: it needs each micro-batch's score rows as soon as its backward has finished;
    ``tensors_key``: where its tensor state lies in a checkpoint's state file."""

    name = tensors_key = ""
    settings: tuple[str, ...] = ()
    edits_gradients = False
    needs_rows = False

    def bind(self, run: RunContext) -> None:
        """The run begins (or resumes): note what the hooks will act on; refuse what cannot be done exactly."""

    def on_micro_batch(self, mb: MicroBatch) -> None:
        """A micro-batch's backward has finished: its gradients are accumulated, not yet clipped."""

    def on_step_complete(self, step: list[MicroBatch]) -> None:
        """The step's gradients are complete (under DDP: after DDP's averaging), before clipping and the optimizer."""

    def on_step_end(self, step: int, drift: float | None, control) -> None:
        """After optimizer step ``step`` (``state.global_step``), with the run's drift then (None without sets)."""

    def on_train_end(self) -> None:
        """Training has ended: take off whatever the policy put on the model."""

    def scalars(self) -> dict[str, float]:
        """The ``sqsd/*`` scalars this policy adds to the Trainer's logs."""
        return {}

    def describe(self) -> dict:
        """Its settings (run.json, the wandb config)."""
        return {k: getattr(self, k) for k in self.settings}

    def state_dict(self) -> dict:
        """Its JSON state for checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Its tensor state for checkpoints (saved under ``tensors_key/``)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_tensors`` saved."""

