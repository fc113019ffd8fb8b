"""Full fine-tuning (plain Linear layers): hooks against the vmap and loop oracles, in training, drift and drops.

Tolerance as for LoRA: per score key, max |hooks − oracle| ≤ 1e-5 × max |oracle| (fp32)."""

import copy

import pytest
import torch

from sqsd_callback import SQSDCallback, score_samples
from sqsd_callback.directions import DirectionSet
from sqsd_callback.layers import LinearTarget, find_targets
from sqsd_callback.sinks import read_jsonl
from sqsd_callback.testing import random_samples, random_set, rel_err, tiny_base, tiny_full_ft

from helpers import SCORE_KEYS, assert_final_drift_is_dense, trainer

MODULES = ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]


def full_ft(arch="llama"):
    return tiny_full_ft(arch, MODULES)


def sets(model):
    return ([random_set(model, "danger", "d1", rank=3, seed=1), random_set(model, "danger", "d2", rank=None, seed=2)],
            [random_set(model, "safety", "s1", rank=2, seed=3)])


def test_targets_are_the_trainable_linear_layers():
    targets = find_targets(full_ft())
    assert all(isinstance(t, LinearTarget) for t in targets.values())
    assert sorted({m.rsplit(".", 1)[1] for m in targets}) == sorted(MODULES)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("metric", ["cosine", "projection", "global_cosine"])
@pytest.mark.parametrize("length", [10, 30])  # 10: ghost norms everywhere; 30: G_i formed where 2T² > in·out
def test_full_ft_engines_agree(arch, metric, length):
    model = full_ft(arch)
    danger, safety = sets(model)
    samples = random_samples(6, seed=length, min_len=length - 4, max_len=length)
    ref = score_samples(model, samples, danger, safety, metric=metric, engine="loop", progress=False)
    for engine in ("hooks", "vmap"):
        got = score_samples(model, samples, danger, safety, metric=metric, engine=engine, batch_size=3,
                            progress=False)
        for k in SCORE_KEYS:
            assert rel_err([r[k] for r in got], [r[k] for r in ref]) < 1e-5, (engine, k)


def _trainer(model, samples, out, cb, steps=2, **kw):
    return trainer(model, samples, out, [cb] if cb else [], accum=2, steps=steps, lr=1e-3,
                   **{"lr_scheduler_type": "constant", "seed": 2, "max_grad_norm": 1.0, **kw})


def test_full_ft_callback_first_step_and_drift(tmp_path):
    model = full_ft()
    danger, safety = sets(model)
    samples = random_samples(8, seed=4)
    expected = score_samples(model, samples, danger, safety, progress=False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    _trainer(model, samples, tmp_path, SQSDCallback(danger, safety), gradient_checkpointing=True).train()
    first = [r for r in read_jsonl(tmp_path / "sqsd" / "scores.jsonl") if r["step"] == 0]
    for k in SCORE_KEYS:
        assert rel_err([r[k] for r in first], [expected[r["index"]][k] for r in first]) < 1e-5, k
    delta = {m: model.get_submodule(m).weight.detach() - start[f"{m}.weight"] for m in find_targets(model)}
    assert_final_drift_is_dense(tmp_path, delta, danger + safety)


def test_full_ft_drop_gives_the_step_without_the_dropped_examples(tmp_path):
    model = full_ft()
    danger, safety = sets(model)
    samples = random_samples(4, seed=21)
    scores = sorted(r["sqsd"] for r in score_samples(model, samples, danger, safety, progress=False))
    threshold = (scores[1] + scores[2]) / 2
    reference = copy.deepcopy(model)
    # AdamW's first step is g/(|g| + eps): where |g| is near eps it magnifies fp32 rounding of the gradient (removal
    # and the reference sum tokens in different orders) to 1.2e-6 in the weights; with eps = 1e-6 it is 3e-8.
    _trainer(model, samples, tmp_path / "drop", SQSDCallback(danger, safety, drop_above=threshold), steps=1,
             max_grad_norm=0.05, adam_epsilon=1e-6).train()
    rows = read_jsonl(tmp_path / "drop" / "sqsd" / "scores.jsonl")
    dropped = {r["index"] for r in rows if r["dropped"]}
    assert len(dropped) == 2
    kept = [s for i, s in enumerate(samples) if i not in dropped]
    trainer(reference, kept, tmp_path / "ref", steps=1, lr=1e-3, lr_scheduler_type="constant", adam_epsilon=1e-6,
            seed=42).train()
    diffs = [(p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters())]
    assert max(diffs) < 1e-6


def test_weight_diff_directions_score_full_ft():
    """Directions from a weight difference (the AsFT / SafeLoRA way) score a full fine-tuning model."""
    base, aligned = tiny_base("llama", seed=0), tiny_base("llama", seed=5)
    safety = DirectionSet.from_weight_diff(aligned, base, kind="safety", name="aligned", rank=4)
    model = full_ft()
    samples = random_samples(4, seed=1)
    with pytest.warns(UserWarning, match="covers 10 of the model's 10"):  # the set also has unused modules
        ref = score_samples(model, samples, [], [safety], engine="loop", progress=False)
    got = score_samples(model, samples, [], [safety], progress=False)
    assert rel_err([r["safety"] for r in got], [r["safety"] for r in ref]) < 1e-5
    assert all(r["sqsd"] == pytest.approx(-r["safety"]) for r in got)
    assert torch.isfinite(torch.tensor([r["safety"] for r in got])).all()
