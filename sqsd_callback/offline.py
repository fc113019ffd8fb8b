"""Offline scoring: SQSD of every sample at a model's parameters, in length-grouped batches, and the paper's protocol
(DESIGN §1), which takes danger projections at a fine-tuning checkpoint θ_t (a LoRA adapter at its own scaling)
and safety projections at θ_0 + α·V_safety (the safety adapter with its scaling replaced by α): each pass loads one
adapter onto the base model, scores the sets it serves and takes the adapter off again."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .bank import DirectionBank
from .directions import DirectionSet
from .directions.hub import adapter_dir, adapter_shapes
from .engines import make_engine
from .layers import find_targets
from .naming import canonical_name
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
    check_adapter_fits(model, path)
    try:
        peft_model = PeftModel.from_pretrained(model, str(path))
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"adapter {path} does not fit the model {_model_name(model)}: {err}") from err
    if scaling is not None:
        for module in peft_model.modules():
            if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
                module.scaling["default"] = scaling
    return peft_model


def check_adapter_fits(model, path: str | Path) -> None:
    """Refuse, before PEFT loads it, a LoRA adapter whose updates have other shapes than the model's modules of the
    same names (an adapter made for another model size), naming one such module with both shapes."""
    have, want = adapter_shapes(path), _module_shapes(model)
    wrong = [(m, shape, want[m]) for m, shape in have.items() if m in want and want[m] != shape]
    if not wrong:
        return
    m, (a_out, a_in), (m_out, m_in) = wrong[0]
    config = Path(path) / "adapter_config.json"
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    raise ValueError(
        f"adapter {path} does not fit the model {_model_name(model)}: {len(wrong)} of its {len(have)} LoRA modules "
        f"have another shape, e.g. {m}: {a_out}×{a_in} (out×in) in the adapter, {m_out}×{m_in} in the model. The "
        f"adapter was made for another model{f' ({base!r}, its adapter_config.json says)' if base else ''}; build "
        f"directions for this model with `sqsd directions --model ...` or pass the model the adapter was trained on.")


def _module_shapes(model) -> dict[str, tuple[int, int]]:
    """out×in of every Linear-like module (nn.Linear, 4-bit and LoRA layers: in/out_features) and GPT-2 Conv1D, by
    the base model's module name."""
    shapes = {}
    for name, module in model.named_modules():
        n_in, n_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if isinstance(n_in, int) and isinstance(n_out, int):
            shapes[canonical_name(name)] = (n_out, n_in)
        elif isinstance(getattr(module, "nf", None), int) and getattr(module, "weight", None) is not None:
            shapes[canonical_name(name)] = (module.nf, module.weight.shape[0])  # Conv1D stores in×out
    return shapes


def _model_name(model) -> str:
    """The model's class and where it was loaded from."""
    where = getattr(getattr(model, "config", None), "name_or_path", "")
    return f"{type(model).__name__} ({where})" if where else type(model).__name__


@contextmanager
def covered_weights_trainable(model, sets: Sequence[DirectionSet]) -> Iterator:
    """``model`` with exactly the weights ``sets`` have directions for trainable, ``requires_grad`` restored on exit:
    an adapter-free pass then scores each example's full gradient on those modules, as a full fine-tune of them would
    take it (a merged θ_0 leaves every weight frozen; the output layer and embeddings stay out either way)."""
    covered = {m for s in sets for m in s.modules}
    was = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.nn.Parameter) and canonical_name(name) in covered:
                weight.requires_grad_(True)
        yield model
    finally:
        for p, flag in was.items():
            p.requires_grad_(flag)


@dataclass
class ScoringPass:
    """Score ``sets`` at base + ``adapter`` (its own scaling, or ``scaling`` in its place); with no adapter, at
    the model's own parameters (the weights the sets cover are then the scored targets, as in full fine-tuning)."""

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
            with covered_weights_trainable(model, p.sets) if p.adapter is None else nullcontext():
                rows = score_samples(scored, samples, danger=[s for s in p.sets if s.kind == "danger"],
                                     safety=[s for s in p.sets if s.kind == "safety"], metric=metric,
                                     engine="hooks", batch_size=batch_size, max_tokens=max_tokens)
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
