"""The package's scores against tests/oracle.py, an independent float64 reference written from DESIGN.md's math
(per-example autograd at batch size 1, dense ΔW, LoRA scaling read from the PEFT config, the metrics written
out), offline (``score_samples``, hooks engine, batches of 4 with padding) and at every optimizer step of a real
Trainer run (``SQSDCallback``, the Trainer's default optimizer, gradient accumulation 1 and 2).

Models: LoRA on attention and MLP modules with a per-module rank and alpha (``rank_pattern``, ``alpha_pattern``,
so scalings differ between modules), plain and rsLoRA; full fine-tuning of five Linear kinds. Sets: a low-rank
and a dense danger set (the dense one covering only q_proj and down_proj) and a low-rank safety set, each module's
direction drawn at its own scale.

Tolerance. The package computes in fp32, the oracle in fp64. Every value the oracle gives is a sum of terms
(per set: one term per module; ``danger``/``safety``: the mean over sets; ``sqsd``: danger − safety), and fp32
rounding is relative to the terms, not to a sum that may cancel, so per example and key:
    |package − oracle| ≤ 1e-5 · (Σ|terms| + 1e-3 · max over the compared examples of Σ|terms|)
where Σ|terms| is the oracle's magnitude of that value (for sqsd: the danger magnitude + the safety magnitude);
the floor keeps an example whose terms are all tiny from being judged against nothing.
"""

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from sqsd_callback import DirectionSet, SQSDCallback, score_samples
from sqsd_callback.directions import Direction
from sqsd_lab.tiny import random_samples, tiny_base, tiny_full_ft

from helpers import trainer
from oracle import METRICS, RefSet, oracle, shapes

RTOL = 1e-5
STEPS = 3
LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def lora_model(rslora: bool):
    """Tiny Llama with LoRA r=4, alpha=8, but r=2 on o_proj and alpha=3 on down_proj; random nonzero B."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0, use_rslora=rslora,
                        rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 3})
    model = get_peft_model(tiny_base("llama", seed=0), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


MODELS = {
    "lora": lambda: lora_model(rslora=False),
    "rslora": lambda: lora_model(rslora=True),
    "full": lambda: tiny_full_ft("llama", modules=("q_proj", "k_proj", "o_proj", "up_proj", "down_proj")),
}
SPECS = [("danger", "d1", 3, None), ("danger", "d2", None, ("q_proj", "down_proj")), ("safety", "s1", 2, None)]


def direction_sets(model, seed=0):
    """(danger, safety, oracle sets): the package's DirectionSets and the oracle's dense copies of the same fp32
    values; rank None = dense; each module's direction at a random scale in [0.5, 3)."""
    g = torch.Generator().manual_seed(seed)
    pkg, ref = {"danger": [], "safety": []}, []
    for kind, name, rank, only in SPECS:
        dirs, dense = {}, {}
        for m, (out, inp) in shapes(model).items():
            if only and not m.endswith(only):
                continue
            scale = 0.5 + 2.5 * float(torch.rand((), generator=g))
            if rank is None:
                V = torch.randn(out, inp, generator=g) * scale
                dirs[m], dense[m] = Direction(dense=V.clone()), V.double()
            else:
                B, A = torch.randn(out, rank, generator=g) * scale, torch.randn(rank, inp, generator=g)
                dirs[m], dense[m] = Direction(B=B.clone(), A=A.clone()), B.double() @ A.double()
        pkg[kind].append(DirectionSet(dirs, kind, name))
        ref.append(RefSet(kind, name, dense))
    return pkg["danger"], pkg["safety"], ref


def assert_match(got: list[dict], want: list[tuple[dict, dict]], where: str) -> float:
    """Each package row equals the oracle's within the module's tolerance; returns the worst error / allowed."""
    keys = list(want[0][0])
    assert len(got) == len(want)
    worst = 0.0
    for k in keys:
        floor = 1e-3 * max(mag[k] for _, mag in want)
        assert floor > 0, f"{where} {k}: every term is zero, the comparison would test nothing"
        for i, (g, (w, mag)) in enumerate(zip(got, want)):
            allowed = RTOL * (mag[k] + floor)
            err = abs(g[k] - w[k])
            worst = max(worst, err / allowed)
            assert err <= allowed, f"{where} example {i} {k}: package {g[k]!r}, oracle {w[k]!r} (allowed {allowed:.2e})"
    return worst


def quiet(fn, *args, **kw):
    """Run fn with the expected 'covers k of n modules' warning (the partial set d2) silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*covers")
        return fn(*args, **kw)


@pytest.mark.parametrize("mode", list(MODELS))
def test_score_samples_equals_the_oracle(mode):
    model = MODELS[mode]()
    danger, safety, ref = direction_sets(model, seed=7)
    samples = random_samples(7, seed=11)
    want = oracle(model, samples, ref)
    for metric in METRICS:
        got = quiet(score_samples, model, samples, danger=danger, safety=safety, metric=metric, engine="hooks",
                    batch_size=4, progress=False)
        assert [r["index"] for r in got] == list(range(len(samples)))
        assert {k for r in got for k in r} >= set(want[metric][0][0])
        assert_match(got, want[metric], f"{mode}/{metric}")
    assert len({round(r["sqsd"], 6) for r, _ in want["cosine"]}) == len(samples), "examples should differ"


class ThetaAtStepBegin(TrainerCallback):
    """θ_s: the trainable parameters as optimizer step s begins (its first micro-batch's forward)."""

    def __init__(self):
        self.theta = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.theta.setdefault(state.global_step, {n: p.detach().clone() for n, p in model.named_parameters()
                                                  if p.requires_grad})


@pytest.mark.parametrize("mode,metric,accum", [
    ("rslora", "cosine", 2), ("rslora", "projection", 2), ("lora", "global_cosine", 1),
    ("full", "cosine", 1), ("full", "projection", 2), ("full", "global_cosine", 2),
])
def test_every_trainer_step_equals_the_oracle_at_that_steps_parameters(tmp_path, mode, metric, accum):
    model = MODELS[mode]()
    danger, safety, ref = direction_sets(model, seed=8)
    samples = random_samples(12, seed=12)
    start, thetas = copy.deepcopy(model), ThetaAtStepBegin()
    quiet(trainer(model, samples, tmp_path, [SQSDCallback(danger, safety, metric=metric), thetas], batch=2,
                  accum=accum, steps=STEPS).train)
    assert sorted(thetas.theta) == list(range(STEPS))
    for s in range(1, STEPS):
        assert any(not torch.equal(thetas.theta[s][n], thetas.theta[s - 1][n]) for n in thetas.theta[s]), \
            f"optimizer step {s - 1} left θ unchanged"
    with open(tmp_path / "sqsd" / "scores.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert sorted({r["step"] for r in rows}) == list(range(STEPS))
    for s in range(STEPS):
        got = [r for r in rows if r["step"] == s]
        assert len(got) == 2 * accum, f"step {s}: {len(got)} rows"
        want = oracle(start, [samples[r["index"]] for r in got], ref, metrics=[metric], theta=thetas.theta[s])
        assert_match(got, want[metric], f"{mode}/{metric} step {s}")
