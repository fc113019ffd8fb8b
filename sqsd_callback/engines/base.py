"""What the callback and offline scoring ask of an engine: per-example ``Stats`` (dots with every direction set
and squared norms of each example's weight update, per module) for a batch of examples.

Two lifecycles share one constructor: a :class:`StepEngine` scores inside the training step (attached to the model
for the run, a record opened at each micro-batch's forward and closed when its backward has finished; its stats
are in the units of the step's own loss weights); an :class:`OracleEngine` scores with extra passes of its own at
the current parameters (the references the fast path is tested against). Both ``compute`` a batch offline."""

from __future__ import annotations

import torch
from torch import nn

from ..bank import DirectionBank
from ..types import Batch, Stats, Target


class Engine:
    """An engine for ``targets`` (the scored layers) and ``bank`` (the direction sets laid out for them); with
    ``keep_grads`` it keeps what exact drops need to remove examples from the step's gradients."""

    name: str = ""

    def __init__(self, targets: dict[str, Target], bank: DirectionBank, keep_grads: bool = False) -> None:
        self.targets, self.bank, self.keep_grads = targets, bank, keep_grads

    @staticmethod
    def check(model: nn.Module) -> None:
        """Refuse, before any pass, a model this engine cannot run (nothing to refuse by default)."""

    def compute(self, model: nn.Module, batch: Batch) -> Stats:
        """Stats of ``batch`` from passes of the engine's own at the current parameters (each example's loss its
        own mean: the batch-size-1 reference)."""
        raise NotImplementedError


class StepEngine(Engine):
    """Scores the training step's own forward and backward passes while attached to the model."""

    def attach(self) -> None:
        """Set the model hooks the run needs."""

    def detach(self) -> None:
        """Remove them."""

    def start(self, batch: Batch) -> None:
        """A training micro-batch's forward begins."""

    def finish(self) -> Stats:
        """Its backward has finished: its stats."""
        raise NotImplementedError

    def removed(self, idx: torch.Tensor):
        """Parameters with the summed gradients of examples ``idx`` of the last pass (``keep_grads``)."""
        raise NotImplementedError


class OracleEngine(Engine):
    """Scores with extra passes at the step's parameters; it never sees the step's gradients, so it cannot drop."""

    def __init__(self, targets: dict[str, Target], bank: DirectionBank, keep_grads: bool = False) -> None:
        if keep_grads:
            raise ValueError(f"engine={self.name!r} scores by extra passes and keeps no per-example gradients of the "
                             f"step; exact drops need engine='hooks'.")
        super().__init__(targets, bank)
