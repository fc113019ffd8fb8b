"""GPT-2's Conv1D trained in full (weights stored in×out), the layer kind added through the registry: scores equal
the batch-size-1 loop at every step, drift equals the dense value, and a dropped example leaves the step it would
have had without it. Tolerances as for Linear: 1e-5 × each key's scale (testing.score_scale); drift rel 1e-4 (fp32
sums); θ 1e-3 × lr."""

import copy

import pytest
import torch

from sqsd_callback import SQSDCallback, score_samples
from sqsd_callback.directions import DirectionSet
from sqsd_callback.layers import Conv1DTarget, find_targets
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.tiny import random_samples, random_set, score_err, tiny_base

from helpers import (
    SCORE_KEYS,
    ThetaEachStep,
    assert_every_step_matches_loop,
    assert_final_drift_is_dense,
    assert_steps_equal_kept_only,
    trainer,
)

MODULES = ("c_attn", "c_fc", "attn.c_proj")


def gpt2_full_ft(seed=0):
    model = tiny_base("gpt2", seed)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".weight") and any(m in name for m in MODULES))
    return model


def sets(model):
    return ([random_set(model, "danger", "d1", rank=3, seed=1), random_set(model, "danger", "d2", rank=None, seed=2)],
            [random_set(model, "safety", "s1", rank=2, seed=3)])


def test_targets_are_the_conv1d_layers_oriented_out_by_in():
    model = gpt2_full_ft()
    targets = find_targets(model)
    assert len(targets) == 6 and all(isinstance(t, Conv1DTarget) for t in targets.values())
    c_attn = targets["transformer.h.0.attn.c_attn"]
    assert c_attn.module.weight.shape == (32, 96) and c_attn.shape == (96, 32)  # stored in×out, scored out×in


@pytest.mark.parametrize("length", [10, 30])  # 30: G_i formed where 2T² > in·out
def test_engines_agree(length):
    model = gpt2_full_ft()
    danger, safety = sets(model)
    samples = random_samples(6, seed=length, min_len=length - 4, max_len=length)
    ref = score_samples(model, samples, danger, safety, engine="loop", progress=False)
    got = score_samples(model, samples, danger, safety, batch_size=3, progress=False)
    for k in SCORE_KEYS:
        assert score_err(got, ref, k) < 1e-5, k


def test_every_step_and_drift(tmp_path):
    model = gpt2_full_ft()
    danger, safety = sets(model)
    samples = random_samples(12, seed=31)
    start, thetas = copy.deepcopy(model), ThetaEachStep()
    trainer(model, samples, tmp_path, [SQSDCallback(danger, safety, metric="projection"), thetas], accum=2,
            gradient_checkpointing=True).train()
    assert_every_step_matches_loop(start, samples, tmp_path, thetas, danger, safety, "projection")
    delta = {m: (model.get_submodule(m).weight - start.get_submodule(m).weight).detach().T  # stored in×out
             for m in find_targets(model)}
    assert_final_drift_is_dense(tmp_path, delta, danger + safety)


def test_drops_at_every_step_equal_steps_on_the_kept_examples(tmp_path):
    model = gpt2_full_ft()
    danger, safety = sets(model)
    samples = random_samples(12, seed=7)
    start, thetas = copy.deepcopy(model), ThetaEachStep()
    trainer(model, samples, tmp_path / "run", [SQSDCallback(danger, safety, drop_top_fraction=0.25), thetas],
            accum=2).train()
    rows = read_jsonl(tmp_path / "run" / "sqsd" / "scores.jsonl")
    assert sum(r["dropped"] for r in rows) == 3  # a quarter of 12
    assert_steps_equal_kept_only(start, samples, rows, tmp_path / "ref", thetas, accum=2)


def test_weight_diff_directions_line_up_with_the_conv1d_update():
    """A direction from a Conv1D weight difference is turned out×in once: its own difference scores cosine 1."""
    base, moved = tiny_base("gpt2", 0), tiny_base("gpt2", 0)
    moved_modules = ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc")
    with torch.no_grad():
        for m in moved_modules:
            w = moved.get_submodule(m).weight
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    diff = DirectionSet.from_weight_diff(moved, base, kind="danger", name="moved")
    model = gpt2_full_ft()
    targets = find_targets(model)
    for m in moved_modules:
        d = diff.modules[m]
        assert d.shape == targets[m].shape
        stored = (moved.get_submodule(m).weight - base.get_submodule(m).weight).detach()
        assert torch.allclose(d.materialize(), stored.T, atol=1e-6)
