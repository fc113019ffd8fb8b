"""Offline scoring: SQSD of every sample at a model's parameters, in length-grouped batches, and the paper's protocol
(DESIGN §1), which takes danger projections at a fine-tuning checkpoint θ_t (a LoRA adapter at its own scaling)
and safety projections at θ_0 + α·V_safety (the safety adapter with its scaling replaced by α): each pass loads one
adapter onto the base model, scores the sets it serves and takes the adapter off again."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .bank import DirectionBank
from .directions import DirectionSet
from .directions.hub import adapter_dir
from .engines import make_engine
from .layers import find_targets
from .scoring import check_metric, combine, project, rows
from .types import collate


def score_samples(
    model,
    samples,
    danger=(),
    safety=(),
    metric: str = "cosine",
    engine: str = "hooks",
    batch_size: int = 8,
    progress: bool = True,
    max_tokens: int | None = None,
) -> list[dict]:
    """SQSD of every sample at the model's current parameters, one row per sample in input order.

    ``samples``: dicts with ``input_ids`` and ``labels`` (−100 = not scored), optional ``attention_mask`` and
    ``index`` (defaults to the sample's position); batches group samples of similar length, at most
    ``batch_size`` of them and, with ``max_tokens``, at most that many padded tokens (long examples go in smaller
    batches, so activation memory stays bounded; a longer example goes alone). Each example is
    scored as the paper does, by its own mean-loss gradient at batch size 1, without dropout; the model's
    parameters, ``.grad`` and train/eval mode are left as found.
    """
    check_metric(metric)
    samples = list(samples)
    if not samples:
        raise ValueError("score_samples got no samples.")
    targets = find_targets(model)
    device = next(iter(targets.values())).params[0].device
    bank = DirectionBank([*danger, *safety], {m: t.shape for m, t in targets.items()}).to(device)
    scorer = make_engine(engine, targets, bank, model=model)
    out: list[dict] = [{} for _ in samples]
    batches = length_batches([len(s.get("input_ids", ())) for s in samples], batch_size, max_tokens)
    for positions in tqdm(batches, desc=f"sqsd score ({engine})", disable=not progress or len(batches) < 2):
        chunk = [samples[i] for i in positions]
        batch = collate(chunk)
        batch.index = [s.get("index", i) for i, s in zip(positions, chunk)]
        stats = scorer.compute(model, batch.to(device))
        for i, row in zip(positions, rows(project(stats, bank, metric), bank, batch.n_scored, batch.index)):
            out[i] = row
    return out


def length_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Positions grouped by length (little padding): at most ``batch_size`` per batch and, with ``max_tokens``, at
    most that many padded tokens (batch size × its longest example); an example longer than ``max_tokens`` alone."""
    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"batch_size and max_tokens must be positive, got {batch_size} and {max_tokens}")
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        last = batches[-1] if batches else None
        fits = last is not None and len(last) < batch_size and (
            max_tokens is None or (len(last) + 1) * lengths[i] <= max_tokens)  # i is the longest so far
        if fits:
            last.append(i)
        else:
            batches.append([i])
    return batches


def load_adapter(model, name_or_path: str | Path, scaling: float | None = None):
    """``model`` with a saved LoRA adapter on top (a PeftModel; ``.unload()`` takes it off); ``scaling`` replaces the
    adapter's own alpha/r factor, as the paper loads θ_0 + α·V_safety."""
    from peft import PeftModel
    path = adapter_dir(name_or_path)
    try:
        peft_model = PeftModel.from_pretrained(model, str(path))
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"adapter {path} does not fit the model ({type(model).__name__}, "
                         f"{getattr(model.config, 'name_or_path', '')}): {err}") from err
    if scaling is not None:
        for module in peft_model.modules():
            if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
                module.scaling["default"] = scaling
    return peft_model


@dataclass
class ScoringPass:
    """Score ``sets`` at base + ``adapter`` (its own scaling, or ``scaling`` in its place); with no adapter, at
    the model's own parameters (its Linear weights are then the scored targets, as in full fine-tuning)."""

    adapter: str | Path | None
    sets: list[DirectionSet]
    scaling: float | None = None

    def describe(self) -> dict:
        return {"adapter": None if self.adapter is None else str(self.adapter),
                "scaling": self.scaling or "adapter's own", "sets": [f"{s.kind}/{s.name}" for s in self.sets]}


def paper_passes(danger: Sequence[tuple[str | Path, DirectionSet]], safety: Sequence[tuple[str | Path, DirectionSet]],
                 checkpoint: str | Path | None = None, alpha: float = 0.5) -> list[ScoringPass]:
    """The paper's initialisations for (adapter, set) pairs: danger sets at the checkpoint θ_t (without one, each at
    θ_0 + α·its own adapter), safety sets each at θ_0 + α·its own adapter."""
    passes = [ScoringPass(checkpoint, [s for _, s in danger])] if checkpoint is not None and danger else \
        [ScoringPass(path, [s], alpha) for path, s in danger]
    return passes + [ScoringPass(path, [s], alpha) for path, s in safety]


def score_offline(model, samples: Sequence[dict], passes: Sequence[ScoringPass], metric: str = "cosine",
                  batch_size: int = 8, max_tokens: int | None = None) -> list[dict]:
    """One row per sample: every set's projection at its pass's parameters, the per-kind means and SQSD (None for a
    sample without scored tokens); ``model`` (the base, θ_0) is left as found."""
    keys = [f"{s.kind}/{s.name}" for p in passes for s in p.sets]
    kinds = {f"{s.kind}/{s.name}": s.kind for p in passes for s in p.sets}
    if len(kinds) != len(keys):
        raise ValueError(f"direction set names must be unique per kind (name them with NAME=ADAPTER); got {keys}")
    values: list[dict] = [{} for _ in samples]
    for p in passes:
        scored = model if p.adapter is None else load_adapter(model, p.adapter, p.scaling)
        try:
            rows = score_samples(scored, samples, danger=[s for s in p.sets if s.kind == "danger"],
                                 safety=[s for s in p.sets if s.kind == "safety"], metric=metric, engine="hooks",
                                 batch_size=batch_size, max_tokens=max_tokens)
        finally:
            if scored is not model:
                scored.unload()
        for value, row in zip(values, rows):
            value.update({f"{s.kind}/{s.name}": row[f"{s.kind}/{s.name}"] for s in p.sets})
    out = []
    for sample, value in zip(samples, values):
        row = {"index": sample.get("index"), "danger": None, "safety": None, "sqsd": None}
        if all(v is not None for v in value.values()):
            row.update(combine(list(value.values()), [kinds[k] for k in value]))
        out.append({**row, **value})
    return out
