"""What the monitor does with scores and drift, one module per policy behind one protocol (``Policy``): drop
risky examples exactly, stop on drift, mask the gradient in the safety basis (WaRP), anchor the update (AsFT).
``build_policies`` makes them from an SQSDConfig, in the order their hooks run."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .anchor import Anchor
from .base import Policy, RunContext
from .drop import DropPolicy, RunningStats
from .mask import SafetyMask
from .stop import DriftStop

if TYPE_CHECKING:
    from ..config import SQSDConfig
    from ..directions import DirectionSet

POLICIES = (DropPolicy, DriftStop, SafetyMask, Anchor)
"""Every policy, in the order their hooks run: drops remove and renormalise the step, the mask projects what is left
(the task gradient, as WaRP masks it), then the anchor adds its gradient, unmasked (a safety penalty's pull)."""


def build_policies(config: SQSDConfig, anchor: DirectionSet | None = None,
                   mask: Iterable[dict] | None = None) -> list[Policy]:
    """The policies ``config`` (an anchor set, safety records for the mask) ask for, in hook order."""
    policies: list[Policy] = []
    if config.drops:
        policies.append(DropPolicy(config.drop_above, config.drop_top_fraction, config.drop_zscore_above,
                                   config.drop_min_history, config.exclude_dropped, config.drop_zscore_robust))
    if config.stop_drift_above is not None:
        policies.append(DriftStop(config.stop_drift_above, config.stop_patience, config.save_last_safe))
    if mask is not None:
        if config.engine != "hooks":  # the oracles' extra backward passes would reach the mask's taps
            raise ValueError(f"The safety mask edits the step's own gradients, which only engine='hooks' leaves "
                             f"alone; got engine={config.engine!r}.")
        policies.append(SafetyMask(mask, config.mask_keep, config.mask_rank, config.mask_modules,
                                   config.mask_batch_size, config.drops))
    else:
        changed = [n for n in ("mask_keep", "mask_rank", "mask_modules", "mask_batch_size") if config.changed(n)]
        if changed:
            raise ValueError(f"{changed[0]}={getattr(config, changed[0])!r} needs mask=[...] (the safety records "
                             f"the WaRP mask is built from).")
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
           "SafetyMask", "build_policies", "describe"]
