"""SQSDConfig: every option of SQSDCallback in one dataclass, documented where declared and checked when built, so
that bad values fail before training; round-trips through dicts, JSON and YAML (axolotl / LLaMA-Factory configs)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .engines import check_engine
from .scoring import check_metric


@dataclass
class SQSDConfig:
    """The callback's options (the direction sets themselves are passed to SQSDCallback)."""

    metric: str = field(default="cosine", metadata={
        "help": "'cosine' (the paper's: Σ over modules of cos(ΔW_i, V)), 'projection' (Σ <ΔW_i, V>/‖V‖) or "
                "'global_cosine' (one cosine over all modules)."})
    engine: str = field(default="hooks", metadata={
        "help": "'hooks' scores the step's own backward pass; 'vmap' and 'loop' run extra oracle passes at the "
                "step's parameters (small models, tests)."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Where the sqsd files go; None: <TrainingArguments.output_dir>/sqsd."})
    drop_above: float | None = field(default=None, metadata={
        "help": "Drop examples whose SQSD exceeds this value (removed exactly from the step's gradients)."})
    drop_top_fraction: float | None = field(default=None, metadata={
        "help": "Drop the riskiest fraction, in (0, 1), of every micro-batch."})
    drop_zscore_above: float | None = field(default=None, metadata={
        "help": "Drop examples this many (> 0) standard deviations above the running mean SQSD."})
    drop_zscore_robust: bool = field(default=False, metadata={
        "help": "Take drop_zscore_above's z-score about the median of the last 4096 scores, in median absolute "
                "deviations × 1.4826, instead of the running mean and standard deviation, which the harmful "
                "outliers themselves inflate; the micro-batch being judged is part of that reference, so harmful "
                "examples in the first steps are not let through a warm-up (needs drop_zscore_above)."})
    drop_min_history: int = field(default=32, metadata={
        "help": "Examples to see before the z-score policy acts (≥ 2); the robust z-score counts the micro-batch it "
                "judges, so with a micro-batch at least this large it acts from the first step (needs "
                "drop_zscore_above)."})
    exclude_dropped: bool = field(default=False, metadata={
        "help": "A dropped example is dropped again whenever it comes back (needs a drop policy)."})
    stop_drift_above: float | None = field(default=None, metadata={
        "help": "Stop the run once sqsd/drift exceeds this value for stop_patience optimizer steps."})
    stop_patience: int = field(default=1, metadata={
        "help": "Consecutive steps above stop_drift_above (≥ 1; needs stop_drift_above)."})
    save_last_safe: bool = field(default=False, metadata={
        "help": "On a drift stop, save the trained weights of the last step below the threshold to "
                "<sqsd dir>/last_safe (needs stop_drift_above)."})
    drift_sample: int = field(default=1, metadata={
        "help": "Full fine-tuning: keep θ_0 of each trained weight at one entry in about this many (≥ 1). 1 keeps an "
                "exact copy (memory: one more copy of the trained weights); above 1, drift projections stay exact "
                "and ‖θ_t − θ_0‖, so the drift cosines, is estimated from the kept entries. LoRA keeps θ_0 as its "
                "small factors either way."})
    anchor_lambda: float = field(default=1.0, metadata={
        "help": "λ of the AsFT anchor penalty (> 0; needs SQSDCallback(anchor=...))."})
    mask_keep: float = field(default=0.9, metadata={
        "help": "WaRP safety mask: per module, protect the most important safety input directions, the fewest "
                "whose importance reaches this share, in (0, 1), of the module's total (needs "
                "SQSDCallback(mask=...))."})
    mask_rank: int | None = field(default=None, metadata={
        "help": "At most this many (≥ 1) protected directions per module; None: as many as mask_keep takes (needs "
                "SQSDCallback(mask=...))."})
    mask_modules: list[str] | None = field(default=None, metadata={
        "help": "Mask only the trained modules whose names contain one of these strings, e.g. ['mlp.down_proj'] "
                "(WaRP's choice); None: every trained module (needs SQSDCallback(mask=...))."})
    mask_batch_size: int = field(default=8, metadata={
        "help": "Safety records per forward/backward pass when the mask is built, once before step 1 (≥ 1; needs "
                "SQSDCallback(mask=...))."})
    top_k: int = field(default=20, metadata={"help": "Riskiest examples in the wandb table (≥ 1)."})
    wandb_every: int = field(default=10, metadata={
        "help": "Logging steps between refreshes of the wandb table and drift heatmap (≥ 1)."})

    def __post_init__(self) -> None:
        check_metric(self.metric)
        check_engine(self.engine)
        if self.output_dir is not None and not isinstance(self.output_dir, (str, Path)):
            raise TypeError(f"output_dir must be a path (str), got {type(self.output_dir).__name__}.")
        if isinstance(self.output_dir, Path):  # kept as str, so that the config round-trips through JSON and YAML
            self.output_dir = str(self.output_dir)
        _number("drop_above", self.drop_above)
        _number("drop_top_fraction", self.drop_top_fraction, low=0, high=1, open_ends=True)
        _number("drop_zscore_above", self.drop_zscore_above, low=0, open_ends=True)
        _number("stop_drift_above", self.stop_drift_above)
        _number("anchor_lambda", self.anchor_lambda, low=0, open_ends=True, optional=False)
        _number("mask_keep", self.mask_keep, low=0, high=1, open_ends=True, optional=False)
        if self.mask_rank is not None:
            _integer("mask_rank", self.mask_rank, 1)
        if self.mask_modules is not None:
            if isinstance(self.mask_modules, str) or not all(isinstance(m, str) and m for m in self.mask_modules):
                raise TypeError(f"mask_modules must be a list of non-empty module-name parts, e.g. "
                                f"['mlp.down_proj'], got {self.mask_modules!r}.")
            self.mask_modules = list(self.mask_modules)
        for name, low in (("drop_min_history", 2), ("stop_patience", 1), ("top_k", 1), ("wandb_every", 1),
                          ("drift_sample", 1), ("mask_batch_size", 1)):
            _integer(name, getattr(self, name), low)
        for name in ("exclude_dropped", "save_last_safe", "drop_zscore_robust"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.exclude_dropped and not self.drops:
            raise ValueError("exclude_dropped=True needs a drop policy (drop_above, drop_top_fraction or "
                             "drop_zscore_above).")
        if self.drop_zscore_robust and self.drop_zscore_above is None:
            raise ValueError("drop_zscore_robust=True needs drop_zscore_above (the threshold, in robust z-scores).")
        if self.save_last_safe and self.stop_drift_above is None:
            raise ValueError("save_last_safe=True needs stop_drift_above.")
        if self.changed("stop_patience") and self.stop_drift_above is None:
            raise ValueError(f"stop_patience={self.stop_patience} needs stop_drift_above (the drift threshold it "
                             f"counts steps above).")
        if self.changed("drop_min_history") and self.drop_zscore_above is None:
            raise ValueError(f"drop_min_history={self.drop_min_history} needs drop_zscore_above (it is the z-score "
                             f"policy's warm-up).")
        if self.drops and self.engine != "hooks":
            raise ValueError(f"Dropping examples edits the step's own gradients, which only engine='hooks' "
                             f"sees; got engine={self.engine!r}.")

    def changed(self, name: str) -> bool:
        """Whether option ``name`` differs from its default (set by the user)."""
        return getattr(self, name) != next(f.default for f in fields(self) if f.name == name)

    @property
    def drops(self) -> bool:
        """Whether any drop policy is set."""
        return any(v is not None for v in (self.drop_above, self.drop_top_fraction, self.drop_zscore_above))

    # ------------------------------------------------------------- round trips
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SQSDConfig:
        """From a mapping (unknown keys are an error naming them and the known ones)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown SQSDConfig option(s) {unknown}; the options are {sorted(known)}.")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> SQSDConfig:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        import yaml
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> SQSDConfig:
        import yaml
        return cls.from_dict(yaml.safe_load(text) or {})


def _number(name: str, value: Any, low: float | None = None, high: float | None = None, open_ends: bool = False,
            optional: bool = True) -> None:
    """A finite real number (not a bool or a string) within (low, high) or [low, high]; None where optional."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}); e.g. {name}=0.5, "
                        f"not {name}='0.5'.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}.")
    below = low is not None and (value <= low if open_ends else value < low)
    above = high is not None and (value >= high if open_ends else value > high)
    if below or above:
        lo, hi = ("(", ")") if open_ends else ("[", "]")
        span = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        raise ValueError(f"{name} must be in {span}, got {value}.")


def _integer(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number, got {value!r} ({type(value).__name__}).")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}.")
