"""Drops, drift stop, the AsFT anchor and resume, each against an independent reference run or formula."""

import copy
import json
from functools import partial

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from sqsd_callback import DirectionSet, SQSDCallback, score_samples
from sqsd_callback.layers import lora_targets
from sqsd_callback.policies import Anchor
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.tiny import random_samples, random_set, three_sets, tiny_base, tiny_lora

from helpers import CrashAtStep3, ThetaEachStep, assert_steps_equal_kept_only, dense_asft, trainer


def _trainer(model, samples, tmp_path, callbacks=(), batch=2, accum=1, steps=1, optim="sgd", **kw):
    return trainer(model, samples, tmp_path, callbacks, batch, accum, steps, optim, lr_scheduler_type="constant", **kw)


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# -------------------------------------------------------------------- drops
@pytest.mark.slow
@pytest.mark.parametrize("optim", ["sgd", "adamw_torch"])
@pytest.mark.parametrize("batch,accum", [(4, 1), (2, 2)])
def test_drop_gives_the_step_without_the_dropped_examples(tmp_path, optim, batch, accum):
    """One optimizer step (clipping active: max_grad_norm 0.05) with two of four examples dropped equals a
    step on the other two alone, to 1e-6 in every LoRA parameter."""
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    samples = random_samples(4, seed=21)
    scores = sorted(r["sqsd"] for r in score_samples(model, samples, danger, safety, progress=False))
    threshold = (scores[1] + scores[2]) / 2
    reference = copy.deepcopy(model)
    cb = SQSDCallback(danger, safety, drop_above=threshold)
    _trainer(model, samples, tmp_path / "drop", [cb], batch=batch, accum=accum, optim=optim).train()
    rows = read_jsonl(tmp_path / "drop" / "sqsd" / "scores.jsonl")
    dropped = {r["index"] for r in rows if r["dropped"]}
    assert len(dropped) == 2 and all((r["sqsd"] > threshold) == r["dropped"] for r in rows)
    kept = [s for i, s in enumerate(samples) if i not in dropped]
    _trainer(reference, kept, tmp_path / "ref", batch=2, accum=1, optim=optim).train()
    got, want = _lora_state(model), _lora_state(reference)
    assert max((got[n] - want[n]).abs().max().item() for n in got) < 1e-6
    assert max((got[n] - want[n]).abs().max().item() for n in got) < 1e-3 * max(
        (want[n] - p).abs().max().item() for n, p in _lora_state(tiny_lora("llama")).items())  # it moved


def test_all_dropped_skips_the_step_and_logs_it(tmp_path):
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    before = _lora_state(model)
    trainer = _trainer(model, random_samples(4, seed=3), tmp_path, [SQSDCallback(danger, safety, drop_above=-1e9)],
                       batch=2, accum=2, optim="adamw_torch")
    trainer.train()
    after = _lora_state(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # no update, not even weight decay or momentum
    assert [h["sqsd/dropped"] for h in trainer.state.log_history if "loss" in h] == [4]


def test_top_fraction_and_zscore_policies_and_exclusion():
    from sqsd_callback.policies import DropPolicy
    rows = [{"index": i, "sqsd": s} for i, s in enumerate([0.1, 0.5, None, 0.3, 0.9])]
    assert DropPolicy(top_fraction=0.5).decide(rows) == [False, True, False, False, True]
    z = DropPolicy(zscore_above=1.0, min_history=4)
    assert z.decide(rows) == [False] * 5  # fewer than 4 examples seen before
    assert z.decide([{"index": 9, "sqsd": 2.0}, {"index": 10, "sqsd": 0.4}]) == [True, False]
    small = DropPolicy(top_fraction=0.1)  # 10% of micro-batches of 8: the remainder carries over
    decided = [small.decide([{"index": 8 * b + i, "sqsd": float(i)} for i in range(8)]) for b in range(10)]
    assert sum(map(sum, decided)) == 8 and all(d[7] for d in decided if any(d))  # 8 of 80, each its batch's riskiest
    ex = DropPolicy(above=0.8, exclude_dropped=True)
    ex.decide(rows)
    assert ex.decide([{"index": 4, "sqsd": 0.0}]) == [True]  # dropped before: dropped for good


def test_robust_zscore_is_not_blinded_by_the_outliers_it_should_drop():
    """One large score inflates the standard deviation so that the plain z-score misses the next outlier; the
    median/MAD z-score drops both, the first in the micro-batch that brings it (its reference includes that
    micro-batch, so there is no warm-up for a harmful example to train in), and keeps ordinary scores."""
    from sqsd_callback.policies import DropPolicy
    history = [{"index": i, "sqsd": s} for i, s in enumerate([0.0, 0.1, -0.1, 0.05, -0.05, 5.0])]
    new = [{"index": 6, "sqsd": 1.0}, {"index": 7, "sqsd": 0.2}]
    plain, robust = DropPolicy(zscore_above=2.0, min_history=6), DropPolicy(zscore_above=2.0, min_history=6,
                                                                            zscore_robust=True)
    assert plain.decide(history) == [False] * 6  # fewer than 6 seen before
    # median 0.025, MAD 0.075 × 1.4826 = 0.1112: 5.0 is 44.7 MADs out, the largest ordinary score 0.7
    assert robust.decide(history) == [False] * 5 + [True]
    assert plain.decide(new) == [False, False]  # (1.0 − 0.833) / 2.03 = 0.08
    # over the 8 scores: median 0.075, MAD 0.125 × 1.4826 = 0.1853: (1.0 − 0.075) / 0.1853 = 4.99, 0.2 → 0.67
    assert robust.decide(new) == [True, False]
    restored = DropPolicy(zscore_above=2.0, min_history=6, zscore_robust=True)
    restored.load_state_dict(robust.state_dict())
    # over the 9 scores: median 0.1, MAD 0.15 × 1.4826 = 0.2224: (0.8 − 0.1) / 0.2224 = 3.15
    assert restored.decide([{"index": 8, "sqsd": 0.8}]) == robust.decide([{"index": 8, "sqsd": 0.8}]) == [True]
    fresh = DropPolicy(zscore_above=2.0, min_history=6, zscore_robust=True)  # without the restored history:
    assert fresh.decide([{"index": 8, "sqsd": 0.8}]) == [False]  # too few scores to judge


def test_exclude_dropped_drops_an_example_again_in_the_next_epoch_and_trains_on_the_kept_only(tmp_path):
    """Two epochs (num_train_epochs=2, no max_steps) of drop_above with exclude_dropped, the default optimizer: the
    rows number the optimizer steps of both epochs, each epoch seeing every example once; every example dropped in
    the first epoch is dropped again in the second (one of them scoring below the threshold there, so only the
    exclusion drops it); every decision is "above the threshold or dropped before"; and θ after every step equals a
    hand-written loop's on that step's kept examples alone."""
    samples, threshold, batch = random_samples(12, seed=5), 0.03, 3
    per_epoch = len(samples) // batch
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    thetas = ThetaEachStep()
    cb = SQSDCallback(danger, safety, drop_above=threshold, exclude_dropped=True)
    run = trainer(model, samples, tmp_path / "run", [cb, thetas], batch=batch, steps=-1, num_train_epochs=2)
    run.train()
    assert run.state.global_step == 2 * per_epoch
    rows = read_jsonl(tmp_path / "run" / "sqsd" / "scores.jsonl")
    assert [r["step"] for r in rows] == [s for s in range(2 * per_epoch) for _ in range(batch)]
    assert all(r["epoch"] == pytest.approx((r["step"] + 1) / per_epoch) for r in rows)  # 0.25 … 2.0
    epochs = [[r for r in rows if r["step"] // per_epoch == e] for e in (0, 1)]
    assert all(sorted(r["index"] for r in rs) == list(range(len(samples))) for rs in epochs)

    first = {r["index"] for r in epochs[0] if r["dropped"]}
    again = {r["index"] for r in epochs[1] if r["dropped"]}
    assert first and first <= again and again != set(range(len(samples)))
    assert any(r["index"] in first and r["sqsd"] <= threshold for r in epochs[1])  # only the exclusion drops it
    before = set()
    for r in rows:  # the decisions by hand
        assert r["dropped"] == (r["sqsd"] > threshold or r["index"] in before), r
        before |= {r["index"]} if r["dropped"] else set()
    assert all(any(not r["dropped"] for r in rows if r["step"] == s) for s in range(2 * per_epoch))  # none skipped
    assert_steps_equal_kept_only(tiny_lora("llama"), samples, rows, tmp_path / "ref", thetas, steps=2 * per_epoch,
                                 batch=batch)


# --------------------------------------------------------------------- stop
class _EveryStep(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _expected_stop(drift, threshold, patience):
    """(stop step, last step with drift ≤ threshold before it), by hand from a recorded drift sequence."""
    streak, last_safe = 0, 0
    for step, d in enumerate(drift, 1):
        streak = streak + 1 if d > threshold else 0
        last_safe = step if d <= threshold else last_safe
        if streak >= patience:
            return step, last_safe
    return None, last_safe


def test_drift_stop_fires_at_the_expected_step_and_saves_the_last_safe_adapter(tmp_path):
    """A free run records its drift per step (deterministic); a run with the same seed and a stop threshold
    stops where that sequence says, and its saved adapter equals the free run's checkpoint at the last step
    whose drift was below the threshold."""
    samples = random_samples(16, seed=8)
    model = tiny_lora("llama")
    danger = [random_set(model, "danger", "d", seed=3)]
    safety = [random_set(model, "safety", "s1", seed=1), random_set(model, "safety", "s2", rank=None, seed=2)]
    free = copy.deepcopy(model)
    _trainer(free, samples, tmp_path / "free", [SQSDCallback(danger, safety)], steps=6,
             save_strategy="steps", save_steps=1).train()
    drift = [d["drift"] for d in read_jsonl(tmp_path / "free" / "sqsd" / "drift.jsonl")]
    cuts = [(a + b) / 2 for a, b in zip(sorted(drift), sorted(drift)[1:])]
    plans = [(_expected_stop(drift, t, p), t, p) for t in cuts for p in (1, 2)]
    (stop_step, last_safe), threshold, patience = max((x for x in plans if x[0][0]), key=lambda x: x[0][1])
    assert last_safe >= 1, drift  # a real mid-run stop, not the trivial first-step one
    steps = _EveryStep()
    cb = SQSDCallback(danger, safety, stop_drift_above=threshold, stop_patience=patience, save_last_safe=True)
    _trainer(model, samples, tmp_path / "stop", [cb, steps], steps=6).train()
    assert steps.steps[-1] == stop_step
    stop = json.loads((tmp_path / "stop" / "sqsd" / "stop.json").read_text())
    assert stop["last_safe_step"] == last_safe and f"stopping at step {stop_step}" in stop["reason"]
    saved = load_file(str(tmp_path / "stop" / "sqsd" / "last_safe" / "adapter_model.safetensors"))
    ref = load_file(str(tmp_path / "free" / f"checkpoint-{last_safe}" / "adapter_model.safetensors"))
    assert saved.keys() == ref.keys()
    assert all(torch.allclose(saved[k], ref[k], atol=1e-7) for k in saved)
    after = load_file(str(tmp_path / "free" / f"checkpoint-{stop_step}" / "adapter_model.safetensors"))
    assert any(not torch.allclose(saved[k], after[k], atol=1e-7) for k in saved)


# ------------------------------------------------------------------- anchor
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [None, 3])
def test_anchor_penalty_and_gradient_equal_dense_asft(rank, dtype):
    """Also with the set held in bf16 (the reference then uses the same rounded V, formed in fp32)."""
    model = tiny_lora("llama")
    ds = random_set(model, "safety", "aligned", rank=rank, seed=4).to(dtype=dtype)
    anchor = Anchor(ds, lam=0.7)
    anchor.use(lora_targets(model))
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    dense = dense_asft(model, {m: d.materialize() for m, d in ds.modules.items()}, 0.7)
    want = torch.autograd.grad(dense, params)
    got_value = anchor.penalty()
    got = torch.autograd.grad(got_value, params)
    assert float(got_value) == pytest.approx(float(dense), rel=1e-5)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6 * w.abs().max().item())


def test_anchor_shrinks_the_orthogonal_component(tmp_path):
    samples = random_samples(16, seed=1)
    base = tiny_base("llama", seed=0)
    aligned = tiny_base("llama", seed=7)
    ds = DirectionSet.from_weight_diff(aligned, base, kind="safety", name="aligned", rank=4)
    dirs = {m: d.materialize() for m, d in ds.modules.items()}

    def orthogonal(model):
        with torch.no_grad():
            return float(dense_asft(model, {m: dirs[m] for m in lora_targets(model)}, 1.0))

    def fresh():  # standard LoRA init (B = 0): the delta starts at zero and grows by training
        from peft import LoraConfig, get_peft_model
        return get_peft_model(tiny_base("llama", seed=0), LoraConfig(r=4, lora_alpha=8,
                                                                     target_modules=["q_proj", "v_proj", "down_proj"]))

    plain, anchored = fresh(), fresh()
    danger, safety = three_sets(plain)
    _trainer(plain, samples, tmp_path / "plain", [SQSDCallback(danger, safety)], steps=6,
             max_grad_norm=1.0).train()
    trainer = _trainer(anchored, samples, tmp_path / "anchor",
                       [SQSDCallback(danger, safety, anchor=ds, anchor_lambda=2.0)], steps=6, max_grad_norm=1.0)
    trainer.train()
    print("orthogonal part, anchored vs plain:", orthogonal(anchored), orthogonal(plain))
    assert orthogonal(anchored) < 0.8 * orthogonal(plain)
    logged = [h["sqsd/anchor_penalty"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 6 and logged[0] == 0.0 and all(v > 0 for v in logged[1:])  # B = 0 before step 1


# ------------------------------------------------------------------- resume
def _row_key(r: dict) -> tuple:
    """What two runs' score rows must share: step, example, SQSD (6 decimals) and the drop decision."""
    return r["step"], r["index"], round(r["sqsd"], 6), r["dropped"]


def _zscore_run(out, samples, extra=(), resume=None, **kw):
    """4 steps of z-score drops (accumulation 2, AdamW), checkpoints every 2: (model, callback)."""
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    cb = SQSDCallback(danger, safety, drop_zscore_above=0.8, drop_min_history=3)
    _trainer(model, samples, out, [cb, *extra], batch=2, accum=2, steps=4, optim="adamw_torch",
             save_strategy="steps", save_steps=2, **kw).train(resume_from_checkpoint=resume)
    return model, cb


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    samples = random_samples(16, seed=12)
    run = partial(_zscore_run, samples=samples)
    whole, whole_cb = run(tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", extra=[CrashAtStep3()])
    assert {r["step"] for r in read_jsonl(tmp_path / "b" / "sqsd" / "scores.jsonl")} == {0, 1, 2}
    resumed, resumed_cb = run(tmp_path / "b", resume=True)
    # the riskiest so far, as the sinks show them (the old code lost them)
    assert resumed_cb.run.summary.top == whole_cb.run.summary.top
    a = read_jsonl(tmp_path / "a" / "sqsd" / "scores.jsonl")
    b = read_jsonl(tmp_path / "b" / "sqsd" / "scores.jsonl")
    assert [_row_key(r) for r in b] == [_row_key(r) for r in a] and any(r["dropped"] for r in a)
    assert [d["step"] for d in read_jsonl(tmp_path / "b" / "sqsd" / "drift.jsonl")] == [1, 2, 3, 4]
    sa, sb = _lora_state(whole), _lora_state(resumed)
    assert all(torch.allclose(sa[n], sb[n], atol=1e-6) for n in sa)


@pytest.mark.slow
def test_a_resume_loads_the_state_of_the_checkpoint_it_resumes_never_another_runs(tmp_path):
    """The Trainer does not tell callbacks which checkpoint it resumes. The old code read
    output_dir/checkpoint-<step> whatever it held: resuming run b's checkpoint with output_dir at run a's folder
    loaded a's drop statistics and θ_0 without a word. The state now carries the Trainer history its checkpoint
    restores: a's is refused by name, and with TrainingArguments(resume_from_checkpoint=...) b's own is found and the
    run equals an uninterrupted one."""
    mine, other = random_samples(16, seed=12), random_samples(16, seed=13)
    _zscore_run(tmp_path / "whole", mine)
    _zscore_run(tmp_path / "other", other)  # its checkpoint-2 holds another run's state
    with pytest.raises(RuntimeError, match="simulated crash"):
        _zscore_run(tmp_path / "b", mine, extra=[CrashAtStep3()])
    ckpt = str(tmp_path / "b" / "checkpoint-2")
    with pytest.raises(ValueError, match="was saved by another run"):
        _zscore_run(tmp_path / "other", mine, resume=ckpt)
    _zscore_run(tmp_path / "elsewhere", mine, resume=ckpt, resume_from_checkpoint=ckpt)
    whole = [_row_key(r) for r in read_jsonl(tmp_path / "whole" / "sqsd" / "scores.jsonl") if r["step"] >= 2]
    resumed = [_row_key(r) for r in read_jsonl(tmp_path / "elsewhere" / "sqsd" / "scores.jsonl")]
    assert resumed == whole and any(r[3] for r in whole)


@pytest.mark.slow
def test_a_callback_trained_again_after_an_interrupted_run_starts_that_run_afresh(tmp_path):
    """An exception skips on_train_end: the old code left the run's hooks on the model (every later forward noted
    twice, its micro-batches never released) and carried the drop statistics into the next train(), as
    hyperparameter search does with callbacks. The second run equals a fresh callback's on the same parameters."""
    samples = random_samples(16, seed=12)
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    options = dict(drop_zscore_above=0.8, drop_min_history=3)
    cb = SQSDCallback(danger, safety, **options)
    train = lambda m, c, out, extra=(): _trainer(m, samples, out, [c, *extra], batch=2, accum=2, steps=4,  # noqa: E731
                                                 optim="adamw_torch").train()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(model, cb, tmp_path / "crashed", [CrashAtStep3()])
    fresh = tiny_lora("llama")  # not a deepcopy: that would carry the crashed run's hooks along
    fresh.load_state_dict(model.state_dict())
    train(fresh, SQSDCallback(danger, safety, **options), tmp_path / "fresh")
    train(model, cb, tmp_path / "again")
    assert not model._forward_pre_hooks and not model._forward_hooks
    again = [_row_key(r) for r in read_jsonl(tmp_path / "again" / "sqsd" / "scores.jsonl")]
    assert again == [_row_key(r) for r in read_jsonl(tmp_path / "fresh" / "sqsd" / "scores.jsonl")]
    assert any(r[3] for r in again)


def test_a_full_disk_when_the_drift_stop_fires_still_stops_the_run(tmp_path, monkeypatch):
    """The old code let the OSError of the last-safe save end train() without on_train_end."""
    from sqsd_callback.runtime.last_safe import LastSafe

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LastSafe, "save", full)
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    cb = SQSDCallback(danger, safety, stop_drift_above=-1e9, stop_patience=1, save_last_safe=True)
    run = _trainer(model, random_samples(8, seed=4), tmp_path, [cb], steps=4)
    run.train()
    assert run.state.global_step == 1 and not model._forward_hooks


@pytest.mark.slow
def test_a_resume_before_a_recorded_drift_stop_sets_that_stop_aside(tmp_path):
    """The old code left stop.json and last_safe/ of a stop at step 3 beside the files of a run resumed from step 2
    that never stopped, as if they were its own. They now move to previous-1/, and the resumed run's files are
    its own."""
    samples = random_samples(8, seed=4)
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    stopping = SQSDCallback(danger, safety, stop_drift_above=-1e9, stop_patience=3, save_last_safe=True)
    run = _trainer(model, samples, tmp_path, [stopping], steps=4, save_strategy="steps", save_steps=2)
    run.train()
    out = tmp_path / "sqsd"
    assert run.state.global_step == 3 and json.loads((out / "stop.json").read_text())["step"] == 3
    assert (out / "last_safe").is_dir()
    model = tiny_lora("llama")
    resumed = _trainer(model, samples, tmp_path, [SQSDCallback(danger, safety)], steps=4, save_strategy="steps",
                       save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert not (out / "stop.json").exists() and not (out / "last_safe").exists()
    assert sorted(p.name for p in (out / "previous-1").iterdir()) == ["last_safe", "stop.json"]
    assert [d["step"] for d in read_jsonl(out / "drift.jsonl")] == [1, 2, 3, 4]


# ----------------------------------------------------------------- bad input
def test_contradictory_and_incomplete_options_fail_before_training():
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    with pytest.raises(ValueError, match="only engine='hooks'"):
        SQSDCallback(danger, safety, engine="loop", drop_above=0.1)
    with pytest.raises(ValueError, match="act on SQSD scores and drift: pass danger"):
        SQSDCallback(stop_drift_above=0.1, anchor=safety[0])
    with pytest.raises(ValueError, match="exclude_dropped=True needs a drop policy"):
        SQSDCallback(danger, exclude_dropped=True)
    with pytest.raises(ValueError, match="save_last_safe=True needs stop_drift_above"):
        SQSDCallback(danger, save_last_safe=True)
    with pytest.raises(ValueError, match="drop_top_fraction must be in"):
        SQSDCallback(danger, drop_top_fraction=1.5)
    with pytest.raises(ValueError, match=r"anchor_lambda must be in \(0, inf\), got 0"):
        SQSDCallback(danger, anchor=safety[0], anchor_lambda=0)


def test_anchor_on_a_model_without_lora_fails_at_train_begin(tmp_path):
    lora = tiny_lora("llama")
    anchor = random_set(lora, "safety", "a")
    trainer = _trainer(tiny_base("llama"), random_samples(4), tmp_path, [SQSDCallback(anchor=anchor)])
    with pytest.raises(ValueError, match="AsFT anchor constrains a LoRA update.*get_peft_model"):
        trainer.train()
