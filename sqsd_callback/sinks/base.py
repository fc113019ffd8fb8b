"""The Sink protocol: one place the monitor's results go, driven by the callback's events; each is built from the
run it serves (``SinkContext``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class SinkContext:
    """What a sink is built from: the run's folder, the Trainer's arguments, the monitor's description (run.json),
    how often wandb views refresh, and each direction set's kind by its key (empty without sets)."""

    folder: Path
    args: object
    described: dict
    wandb_every: int
    set_kinds: dict[str, str]


class Sink:
    """One place the monitor's results go, driven by the callback's events (one small class per backend, as
    transformers' reporting integrations are). Only the main process has sinks."""

    @classmethod
    def for_run(cls, run: SinkContext) -> Sink:
        """The sink for ``run``."""
        raise NotImplementedError

    def step(self, step: int, rows: list[dict], drift: dict | None, texts: list[dict]) -> None:
        """After optimizer step ``step``: the step's score rows (every process's), the drift row (None without
        direction sets) and the texts of examples seen for the first time."""

    def log(self, step: int, scalars: dict[str, float], values: list[float], top: list[dict]) -> None:
        """At a Trainer logging step: the ``sqsd/*`` scalars, the logging window's SQSD values and the riskiest
        examples so far."""

    def close(self) -> None:
        """The run has ended."""


def trainer_keys(scalars: dict[str, float]) -> dict[str, float]:
    """The names the Trainer's own reporters give training scalars (``train/sqsd/drift``)."""
    return {f"train/{k}": v for k, v in scalars.items()}
