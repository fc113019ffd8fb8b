"""The drift stop: end the run once its drift toward danger stays above a threshold, and keep the trained weights
of the last step below it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.utils import logging

from ..runtime.last_safe import LastSafe
from .base import Policy, RunContext

logger = logging.get_logger(__name__)


@dataclass
class DriftStop(Policy):
    """Stop once the run's drift has been above ``threshold`` for ``patience`` consecutive optimizer steps;
    remembers the last step whose drift was below it and, with ``save_last_safe``, that step's trained weights
    (saved to ``<run folder>/last_safe`` when the run stops)."""

    threshold: float
    patience: int = 1
    save_last_safe: bool = False
    streak: int = 0
    last_safe_step: int = 0
    last_safe: LastSafe | None = field(default=None, repr=False)
    name = "stop"
    tensors_key = "safe"  # the last safe step's weights
    settings = ("threshold", "patience")

    def update(self, step: int, drift: float) -> bool:
        """Record the drift after ``step`` optimizer steps; True when the run should stop."""
        if drift > self.threshold:
            self.streak += 1
        else:
            self.streak, self.last_safe_step = 0, step
        return self.streak >= self.patience

    def bind(self, run: RunContext) -> None:
        self.folder = run.folder
        if self.save_last_safe:
            self.last_safe = LastSafe(run.model, run.params)
            if run.fresh:  # θ_0, where the run starts, is safe
                self.last_safe.keep()

    def on_step_end(self, step: int, drift: float | None, control) -> None:
        if drift is None:
            return
        if not self.update(step, drift):
            if drift <= self.threshold and self.last_safe is not None:
                self.last_safe.keep()
            return
        control.should_training_stop = True
        reason = (f"sqsd: stopping at step {step}: drift {drift:+.4f} above {self.threshold} for {self.patience} "
                  f"step(s); last step below it: {self.last_safe_step}")
        try:  # a full disk must not turn the stop into a crash: the run stops either way
            if self.last_safe is not None and self.last_safe.tensors is not None:
                path = self.last_safe.save(self.folder.path / "last_safe", self.last_safe_step, self.folder.main)
                reason += f", its adapter saved to {path}"
            self.folder.write_stop({"step": step, "drift": drift, "threshold": self.threshold,
                                    "patience": self.patience, "last_safe_step": self.last_safe_step,
                                    "reason": reason})
        except OSError as err:
            reason += f"; writing the last safe adapter or stop.json in {self.folder.path} failed ({err})"
        logger.warning(reason)

    def state_dict(self) -> dict:
        return {"streak": self.streak, "last_safe_step": self.last_safe_step}

    def load_state_dict(self, state: dict) -> None:
        self.streak, self.last_safe_step = state.get("streak", 0), state.get("last_safe_step", 0)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = self.last_safe.tensors if self.last_safe is not None else None
        return dict(tensors or {})

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.last_safe is not None and tensors:
            self.last_safe.tensors = tensors
