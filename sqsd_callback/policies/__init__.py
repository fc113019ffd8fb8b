"""What the monitor does with scores and drift, one module per policy behind one protocol (``Policy``): drop
risky examples exactly, stop on drift, anchor the update (AsFT). ``build_policies`` makes them from an
SQSDConfig, in the order their hooks run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .anchor import Anchor
from .base import Policy, RunContext
from .drop import DropPolicy, RunningStats
from .stop import DriftStop

if TYPE_CHECKING:
    from ..config import SQSDConfig
    from ..directions import DirectionSet

POLICIES = (DropPolicy, DriftStop, Anchor)
"""Every policy, in the order their hooks run (drops renormalise the step before the anchor adds its gradient)."""


def build_policies(config: SQSDConfig, anchor: DirectionSet | None = None) -> list[Policy]:
    """The policies ``config`` (and an anchor set) ask for, in hook order."""
    policies: list[Policy] = []
    if config.drops:
        policies.append(DropPolicy(config.drop_above, config.drop_top_fraction, config.drop_zscore_above,
                                   config.drop_min_history, config.exclude_dropped, config.drop_zscore_robust))
    if config.stop_drift_above is not None:
        policies.append(DriftStop(config.stop_drift_above, config.stop_patience, config.save_last_safe))
    if anchor is not None:
        policies.append(Anchor(anchor, config.anchor_lambda))
    elif config.changed("anchor_lambda"):
        raise ValueError(f"anchor_lambda={config.anchor_lambda} needs anchor=DirectionSet(...) (the aligned "
                         f"directions the AsFT anchor keeps the update to).")
    return policies


def describe(policies: list[Policy]) -> dict:
    """Every policy's settings by name, None for those not in use (run.json, the wandb config)."""
    return {**{p.name: None for p in POLICIES}, **{p.name: p.describe() for p in policies}}


__all__ = ["POLICIES", "Anchor", "DriftStop", "DropPolicy", "Policy", "RunContext", "RunningStats",
           "build_policies", "describe"]
