"""An independent reference for SQSD scores, written from the math in DESIGN.md §1 and nothing of the package.

It imports no part of sqsd_callback: its per-example update, module naming, LoRA scaling, metrics and combination
are written out here, so a mistake in the package's score layer (‖V‖, sum over modules, the metrics' normalisation,
which direction goes with which module, LoRA's scaling) cannot cancel out of a comparison with it.

For one example i at parameters θ (the model as given, cast to float64):

- ``loss_i`` is the example's mean next-token cross-entropy over its scored tokens (logits at t predict token
  t+1; a label −100 is not scored), computed on the example alone (batch size 1); g_i = ∇_θ loss_i by autograd.
- Per trained module m (the base model's own name, PEFT's ``base_model.model.`` prefix stripped), the update is
  formed densely, out×in: LoRA ``ΔW_i,m = −s_m (gB @ A + B @ gA)`` with ``s_m = alpha_m / r_m``, or
  ``alpha_m / √r_m`` under rsLoRA, r and alpha read from ``model.peft_config`` (its ``rank_pattern`` and
  ``alpha_pattern`` included); full fine-tuning ``ΔW_i,m = −∂loss_i/∂W_m`` for every nn.Linear whose weight trains.
- For a direction set D = {m: V_m}, with M(D) the modules D and the model both have:
    cosine         P_i(D) = Σ_{m∈M(D)} <ΔW_m, V_m> / (‖ΔW_m‖ ‖V_m‖)      (a term is 0 where ΔW_m = 0)
    projection     P_i(D) = Σ_{m∈M(D)} <ΔW_m, V_m> / ‖V_m‖
    global_cosine  P_i(D) = Σ_{m∈M(D)} <ΔW_m, V_m> / (√Σ_{m∈M(D)} ‖ΔW_m‖² · √Σ_{m∈M(D)} ‖V_m‖²)
  all norms Frobenius. global_cosine is the cosine between ΔW and V concatenated over M(D) only: a module the
  model trains but D does not cover adds nothing to ‖ΔW‖ (this is how sqsd_callback/scoring.py defines it, per
  set, from the modules present in that set; the cosine of V padded with zeros against the update of every
  trained module would also count the uncovered modules' ‖ΔW_m‖²).
- SQSD_i = mean over danger sets of P_i − mean over safety sets of P_i; the row also holds ``danger``,
  ``safety`` (those means) and each set's P_i under ``danger/<name>``, ``safety/<name>``.

Each value comes with a magnitude, the same sum with every term's absolute value (per set: Σ_m |term_m|; the
kinds' means of those; sqsd: danger's + safety's), so that tests can bound an error relative to the terms
summed rather than to a sum (or a difference) that cancels.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."
METRICS = ("cosine", "projection", "global_cosine")


@dataclass
class RefSet:
    """A direction set as the oracle sees it: kind ("danger"/"safety"), name, and dense V_m (out×in) by module."""

    kind: str
    name: str
    dirs: dict[str, torch.Tensor]


def base_name(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _pattern(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key applies to a module whose name is it or ends in '.<key>'."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


def lora_scaling(config, name: str) -> float:
    """s = alpha / r (alpha / √r with use_rslora) for module ``name``, from the PEFT adapter's LoraConfig."""
    r = _pattern(config.rank_pattern, name, config.r)
    alpha = _pattern(config.alpha_pattern, name, config.lora_alpha)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def at_theta(model: nn.Module, theta: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A float64 copy of ``model`` with the parameters named in ``theta`` set to its values."""
    ref = copy.deepcopy(model).double().eval()  # no dropout
    if theta:
        params = dict(ref.named_parameters())
        with torch.no_grad():
            for n, v in theta.items():
                params[n].copy_(v)
    return ref


def trained(model: nn.Module) -> dict[str, tuple[torch.Tensor, ...]]:
    """The trained modules by base-model name: (A, B) of each LoRA layer of the model's one adapter, else
    (W,) of each nn.Linear whose weight trains."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        (adapter, _), = peft_config.items()  # one adapter
        return {base_name(n): (m.lora_A[adapter].weight, m.lora_B[adapter].weight) for n, m in model.named_modules()
                if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and adapter in m.lora_A}
    return {base_name(n): (m.weight,) for n, m in model.named_modules()
            if type(m) is nn.Linear and m.weight.requires_grad}


def shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """out×in of every trained module's weight (of its merged LoRA delta B @ A)."""
    return {m: (ps[-1].shape[0], ps[0].shape[1]) for m, ps in trained(model).items()}


def updates(ref: nn.Module, sample: dict) -> dict[str, torch.Tensor]:
    """ΔW_m (float64, out×in) of every trained module for one example alone; ``ref`` is a float64 model."""
    peft_config = getattr(ref, "peft_config", None)
    config = next(iter(peft_config.values())) if peft_config else None
    params = trained(ref)
    ids = torch.tensor([sample["input_ids"]])
    mask = torch.tensor([sample["attention_mask"]]) if "attention_mask" in sample else None
    labels = torch.tensor(sample["labels"])
    logits = ref(input_ids=ids, attention_mask=mask).logits[0]
    target = labels[1:]
    scored = target != -100
    loss = nn.functional.cross_entropy(logits[:-1][scored], target[scored])  # mean over the scored tokens
    flat = [p for ps in params.values() for p in ps]
    grads = iter(torch.autograd.grad(loss, flat))
    out = {}
    for m, ps in params.items():
        if peft_config:
            (A, B), gA, gB = ps, next(grads), next(grads)
            out[m] = -lora_scaling(config, m) * (gB @ A.detach() + B.detach() @ gA)
        else:
            out[m] = -next(grads)
    return out


def project(delta: dict[str, torch.Tensor], ref_set: RefSet, metric: str) -> tuple[float, float]:
    """(P(D), Σ|term|) for one example's updates ``delta`` and one set."""
    common = [m for m in delta if m in ref_set.dirs]
    dots = [float((delta[m] * ref_set.dirs[m].double()).sum()) for m in common]
    w = [float(delta[m].norm()) for m in common]
    v = [float(ref_set.dirs[m].double().norm()) for m in common]
    if metric == "cosine":
        terms = [d / (a * b) if a > 0 else 0.0 for d, a, b in zip(dots, w, v)]
    elif metric == "projection":
        terms = [d / b for d, b in zip(dots, v)]
    elif metric == "global_cosine":
        w_all = math.sqrt(sum(a * a for a in w))
        v_all = math.sqrt(sum(b * b for b in v))
        terms = [d / (w_all * v_all) if w_all > 0 else 0.0 for d in dots]
    else:
        raise ValueError(metric)
    return sum(terms), sum(abs(t) for t in terms)


def score_row(delta: dict[str, torch.Tensor], sets: list[RefSet], metric: str) -> tuple[dict, dict]:
    """One example's row (``danger``, ``safety``, ``sqsd``, per-set keys) and the magnitudes of its values."""
    row, mag = {}, {}
    for s in sets:
        row[f"{s.kind}/{s.name}"], mag[f"{s.kind}/{s.name}"] = project(delta, s, metric)
    for kind in ("danger", "safety"):
        keys = [f"{s.kind}/{s.name}" for s in sets if s.kind == kind]
        row[kind] = sum(row[k] for k in keys) / len(keys)
        mag[kind] = sum(mag[k] for k in keys) / len(keys)
    row["sqsd"], mag["sqsd"] = row["danger"] - row["safety"], mag["danger"] + mag["safety"]
    return row, mag


def oracle(model: nn.Module, samples: list[dict], sets: list[RefSet], metrics=METRICS,
           theta: dict[str, torch.Tensor] | None = None) -> dict[str, list[tuple[dict, dict]]]:
    """``{metric: [(row, magnitudes) per sample]}`` at ``model``'s parameters (or ``theta``), in float64."""
    ref = at_theta(model, theta)
    deltas = [updates(ref, s) for s in samples]
    return {metric: [score_row(d, sets, metric) for d in deltas] for metric in metrics}
