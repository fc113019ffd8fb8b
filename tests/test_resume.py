"""A run killed after a checkpoint and resumed from it equals the same run uninterrupted, at every step: score rows,
drop decisions, θ after each step, the AsFT anchor's penalty and the drift stop (a streak of steps above the
threshold that spans the checkpoint), in one process and in a 2-process DDP run (gloo, CPU). The Trainer's default
optimizer throughout."""

import json
import statistics
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from sqsd_callback import SQSDCallback
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.tiny import random_samples, random_set, rel_err, three_sets, tiny_lora

from helpers import SCORE_KEYS, CrashAt, ThetaEachStep, launch, trainer

TOL = 1e-6


def assert_rows_equal(got: list[dict], want: list[dict], keys=SCORE_KEYS, tol=TOL) -> None:
    """The same examples in the same order at every step, the same drop decisions, and every score key within
    ``tol`` relative (max |got − want| / max |want| over the step's rows)."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for s in sorted({r["step"] for r in want}):
        a, b = [r for r in got if r["step"] == s], [r for r in want if r["step"] == s]
        assert [(r["index"], r["dropped"]) for r in a] == [(r["index"], r["dropped"]) for r in b], f"step {s}"
        errs = {k: rel_err([r[k] for r in a], [r[k] for r in b]) for k in keys}
        assert max(errs.values()) <= tol, f"step {s}: {errs}"


def assert_thetas_equal(got: dict, want: dict, steps, tol=TOL) -> None:
    """θ after each of ``steps`` (``ThetaEachStep.theta``) within ``tol`` in every trainable parameter."""
    for s in steps:
        err = max((got[s][n] - want[s][n]).abs().max().item() for n in want[s])
        assert err <= tol, f"θ after step {s}: max |Δ| = {err:.3g}"


def streaks(drift: list[float], threshold: float) -> list[int]:
    """The number of consecutive steps above ``threshold`` after each step 1, 2, … (index 0 is step 1)."""
    out, streak = [], 0
    for d in drift:
        streak = streak + 1 if d > threshold else 0
        out.append(streak)
    return out


def expected_stop(drift: list[float], threshold: float, patience: int, start: int = 0, streak: int = 0,
                  last_safe: int = 0) -> tuple[int | None, int]:
    """(step the drift stop fires at, last step with drift ≤ threshold before it) from the drift after each step,
    starting after step ``start`` with the given streak and last safe step."""
    for step, d in enumerate(drift[start:], start + 1):
        streak = streak + 1 if d > threshold else 0
        last_safe = step if d <= threshold else last_safe
        if streak >= patience:
            return step, last_safe
    return None, last_safe


# ------------------------------------------------------- one process: anchor and a stop streak over the checkpoint
STEPS, PATIENCE, LAMBDA = 6, 3, 0.5


def _anchored_run(out: Path, threshold=None, crash=None, resume=None, thetas=None, save_strategy="steps"):
    """6 steps of the tiny LoRA model with the AsFT anchor (and a drift stop, patience 3, at ``threshold``, saving
    the last safe adapter), the default optimizer, a checkpoint every step unless ``save_strategy="no"``: (trainer,
    θ after each step, recorded in ``thetas``)."""
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    stop = {} if threshold is None else dict(stop_drift_above=threshold, stop_patience=PATIENCE,
                                                          save_last_safe=True)
    cb = SQSDCallback(danger, safety, anchor=random_set(model, "safety", "aligned", rank=2, seed=9),
                      anchor_lambda=LAMBDA, **stop)
    thetas = ThetaEachStep() if thetas is None else thetas
    run = trainer(model, random_samples(16, seed=12), out, [cb, thetas, *([CrashAt(crash)] if crash else [])],
                  steps=STEPS, save_strategy=save_strategy, save_steps=1)
    run.train(resume_from_checkpoint=resume)
    return run, thetas.theta


def _penalties(run) -> dict[int, float]:
    return {h["step"]: h["sqsd/anchor_penalty"] for h in run.state.log_history if "loss" in h}


@pytest.mark.slow
def test_resume_keeps_the_anchor_and_a_stop_streak_that_spans_the_checkpoint(tmp_path):
    """The uninterrupted run (no stop: the stop does not act before it fires) gives every step's rows, θ, anchor
    penalty and drift; its drift picks the threshold and the crash: the streak of steps above the threshold that
    ends in the stop has begun at checkpoint K (1 ≤ streak < patience) and has not reached patience at K + 1, where
    the run is killed. The resumed run equals the uninterrupted one at every step and stops where its drift says,
    saving the adapter of its last safe step (before the checkpoint: kept in the checkpoint's state). A resume that
    restarted the streak at 0, lost θ_0 of the drift, the last safe weights or the anchor would stop elsewhere, save
    other weights or train other parameters."""
    whole, whole_thetas = _anchored_run(tmp_path / "whole", save_strategy="no")
    drift = [d["drift"] for d in read_jsonl(tmp_path / "whole" / "sqsd" / "drift.jsonl")]
    assert len(drift) == STEPS
    plans = []
    for t in sorted(drift)[:-1]:  # thresholds just above each recorded drift but the largest
        t = t + 1e-3 * (max(drift) - min(drift))
        stop, last_safe = expected_stop(drift, t, PATIENCE)
        streak = streaks(drift, t)
        for k in range(1, STEPS - 1):  # checkpoint k, killed at the end of step k + 1, before the stop
            if stop and stop - PATIENCE < k < stop - 1 and last_safe >= 1:  # the stop's streak has begun at k
                assert 1 <= streak[k - 1] < PATIENCE
                plans.append((k, t, stop, last_safe))
    assert plans, f"no threshold gives a stop streak over a checkpoint: drift {drift}"
    ckpt, threshold, stop_step, last_safe = plans[0]
    # a streak restarted at 0 on resume would stop elsewhere, or not at all
    assert expected_stop(drift, threshold, PATIENCE, start=ckpt)[0] != stop_step

    crashed = ThetaEachStep()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _anchored_run(tmp_path / "b", threshold, crash=ckpt + 1, thetas=crashed)
    assert not (tmp_path / "b" / f"checkpoint-{ckpt + 1}").exists()
    assert not (tmp_path / "b" / "sqsd" / "stop.json").exists()  # killed before the streak reached patience
    assert max(r["step"] for r in read_jsonl(tmp_path / "b" / "sqsd" / "scores.jsonl")) == ckpt  # rows past it
    resumed, resumed_thetas = _anchored_run(tmp_path / "b", threshold, resume=True)

    # the stop: where the uninterrupted run's drift says
    assert resumed.state.global_step == stop_step
    record = json.loads((tmp_path / "b" / "sqsd" / "stop.json").read_text())
    assert (record["step"], record["last_safe_step"]) == (stop_step, last_safe), record
    assert last_safe < ckpt
    saved = load_file(str(tmp_path / "b" / "sqsd" / "last_safe" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "b" / f"checkpoint-{last_safe}" / "adapter_model.safetensors"))
    assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)
    # every step's rows, drift, anchor penalty and θ up to the stop
    rows = read_jsonl(tmp_path / "b" / "sqsd" / "scores.jsonl")
    assert sorted({r["step"] for r in rows}) == list(range(stop_step))
    assert_rows_equal(rows, [r for r in read_jsonl(tmp_path / "whole" / "sqsd" / "scores.jsonl")
                             if r["step"] < stop_step])
    got = read_jsonl(tmp_path / "b" / "sqsd" / "drift.jsonl")
    assert [d["step"] for d in got] == list(range(1, stop_step + 1))
    assert rel_err([d["drift"] for d in got], drift[:stop_step]) <= TOL
    penalties, want = _penalties(resumed), _penalties(whole)
    assert sorted(penalties) == list(range(1, stop_step + 1)) and all(v > 0 for v in want.values())
    assert rel_err([penalties[s] for s in sorted(penalties)], [want[s] for s in sorted(penalties)]) <= TOL
    assert sorted(crashed.theta) == list(range(ckpt + 2))
    assert sorted(resumed_thetas) == list(range(ckpt, stop_step + 1))
    assert_thetas_equal(crashed.theta, whole_thetas, range(ckpt + 2))
    assert_thetas_equal(resumed_thetas, whole_thetas, range(ckpt, stop_step + 1))
    moved = min(max((whole_thetas[s + 1][n] - whole_thetas[s][n]).abs().max().item() for n in whole_thetas[s])
                for s in range(STEPS))
    assert moved > 1e3 * TOL  # every step moved θ far more than the tolerance


# ---------------------------------------------------------------------------- DDP: drops over two epochs
def robust_zscore_decisions(micro_steps: list[list[dict]], z: float, min_history: int, exclude: bool,
                            seen=(), dropped=()) -> list[bool]:
    """The drop decisions of ``SQSDConfig(drop_zscore_above=z, drop_zscore_robust=True, drop_min_history=...,
    exclude_dropped=exclude)`` by hand, micro-step by micro-step (each the rows of every rank, in rank order), after
    the scores ``seen`` and the examples ``dropped`` before: a row is dropped when its SQSD is more than
    z × 1.4826 × MAD above the median of every score so far, the micro-step's own included (fewer than the policy's
    window of 4096), once there are ``min_history`` of them, or (``exclude``) when its example was dropped before."""
    seen, dropped, out = list(seen), set(dropped), []
    for rows in micro_steps:
        seen += [r["sqsd"] for r in rows]
        median = statistics.median(seen)
        scale = 1.4826 * statistics.median(abs(x - median) for x in seen)
        decided = [(len(seen) >= min_history and scale > 0 and (r["sqsd"] - median) / scale > z)
                   or (exclude and r["index"] in dropped) for r in rows]
        dropped |= {r["index"] for r, d in zip(rows, decided) if d}
        out += decided
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason=(
    "transformers < 5 resumes a multi-process CPU run's optimizer state with map_location=args.device ('cpu:0'), "
    "which torch.load cannot restore; transformers 5 loads it to 'cpu'"))
def test_ddp_resume_in_the_second_epoch_equals_the_uninterrupted_run(tmp_path):
    """2 processes (gloo), accumulation 2, robust z-score drops that exclude an example dropped before, two epochs,
    the default optimizer: killed at the end of step 5 and resumed from checkpoint-4, in the second epoch (a new
    model, callback and Trainer). Every step's rows, drop decisions and θ equal the uninterrupted run's, whose
    decisions equal the policy worked by hand. The decisions after the checkpoint need the examples dropped before
    it (some come back in the second epoch) and the scores seen before it (the z-score's median, MAD and minimum
    history), so a resume that forgot either would decide otherwise."""
    from ddp_resume_worker import CRASH, EPOCHS, OPTIONS, STEPS_PER_EPOCH

    launch(Path(__file__).with_name("ddp_resume_worker.py"), tmp_path)
    assert max(r["step"] for r in read_jsonl(tmp_path / "crashed-rows.jsonl")) == CRASH - 1  # cut back on resume
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4",
                                                                            "checkpoint-6"]

    steps, ckpt = EPOCHS * STEPS_PER_EPOCH, CRASH - 1
    whole = read_jsonl(tmp_path / "whole" / "sqsd" / "scores.jsonl")
    assert [r["step"] for r in whole] == [s for s in range(steps) for _ in range(8)]  # 2 ranks × 2 × 2 per step
    for e in range(EPOCHS):  # each epoch sees every example once
        assert sorted(r["index"] for r in whole if r["step"] // STEPS_PER_EPOCH == e) == list(range(24))
    assert_rows_equal(read_jsonl(tmp_path / "b" / "sqsd" / "scores.jsonl"), whole)

    # the decisions, by hand: micro-step k of a step is rank 0's k-th micro-batch, then rank 1's
    micro = [[*step[2 * k:2 * k + 2], *step[4 + 2 * k:6 + 2 * k]]
             for step in ([r for r in whole if r["step"] == s] for s in range(steps)) for k in (0, 1)]
    options = dict(z=OPTIONS["drop_zscore_above"], min_history=OPTIONS["drop_min_history"], exclude=True)
    flat = [r for rows in micro for r in rows]
    assert robust_zscore_decisions(micro, **options) == [r["dropped"] for r in flat]
    # the decisions after the checkpoint need both parts of the policy's state before it: a resume that forgot the
    # examples dropped before, or the scores seen before, would decide otherwise
    before, after = micro[:2 * ckpt], micro[2 * ckpt:]
    seen = [r["sqsd"] for rows in before for r in rows]
    dropped = {r["index"] for rows in before for r in rows if r["dropped"]}
    want = [r["dropped"] for rows in after for r in rows]
    assert robust_zscore_decisions(after, seen=seen, dropped=dropped, **options) == want
    assert robust_zscore_decisions(after, seen=seen, **options) != want, "no drop after the checkpoint needs the set"
    assert robust_zscore_decisions(after, dropped=dropped, **options) != want, "none needs the scores seen before"
    assert any(want) and not all(want)

    thetas = {name: torch.load(tmp_path / f"thetas-{name}.pt") for name in ("whole", "crashed", "resumed")}
    assert sorted(thetas["whole"]) == list(range(steps + 1))
    assert sorted(thetas["crashed"]) == list(range(CRASH + 1)) and sorted(thetas["resumed"]) == list(
        range(ckpt, steps + 1))
    assert_thetas_equal(thetas["crashed"], thetas["whole"], range(CRASH + 1))
    assert_thetas_equal(thetas["resumed"], thetas["whole"], range(ckpt, steps + 1))
    whole = thetas["whole"]
    assert min(max((whole[s + 1][n] - whole[s][n]).abs().max().item() for n in whole[s]) for s in range(steps)) > 1e-3
