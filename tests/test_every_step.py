"""Every optimizer step, under every optimizer users pick: each row of scores.jsonl equals the batch-size-1 loop
at the parameters θ_s that step used, and a step with drops equals a step on the kept examples alone.

The Trainer's default optimizer (fused AdamW) and bitsandbytes' 8-bit AdamW update parameters in place without
bumping autograd's version counters, so any per-step constant the engine caches from the live parameters goes
stale at step 1. Tolerance: per step and score key, max |row − loop| ≤ 1e-5 × the key's scale (fp32): max |loop|
for a set's score; danger, safety and sqsd = danger − safety against their terms' (testing.score_scale)."""

import copy

import pytest
import torch

from sqsd_callback import SQSDCallback
from sqsd_callback.layers.lora import LoraHooks
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.tiny import random_samples, random_set, three_sets, tiny_full_ft, tiny_lora

from helpers import (
    ThetaEachStep,
    assert_every_step_matches_loop,
    assert_final_drift_is_dense,
    assert_steps_equal_kept_only,
    trained_weights,
    trainer,
)

STEPS = 3
OPTIMS = ["default", "adamw_torch_foreach",  # the fast suite: the default and the one that failed on a CPU
          *(pytest.param(o, marks=pytest.mark.slow) for o in ("adamw_torch", "sgd", "adafactor", "adamw_bnb_8bit"))]
MODES = {"lora": lambda: tiny_lora("llama"), "full": lambda: tiny_full_ft("llama")}


def _sets(model, mode):
    if mode == "lora":
        return three_sets(model)
    return ([random_set(model, "danger", "d1", rank=3, seed=1), random_set(model, "danger", "d2", rank=None, seed=2)],
            [random_set(model, "safety", "s1", rank=2, seed=3)])


def _optim(model, name):
    """TrainingArguments.optim (None: the default) or, for foreach AdamW (no optim name selects it on CPU), the
    optimizer itself."""
    if name == "default":
        return None, (None, None)
    if name == "adamw_torch_foreach":
        params = [p for p in model.parameters() if p.requires_grad]
        return None, (torch.optim.AdamW(params, lr=0.05, foreach=True), None)
    return name, (None, None)


@pytest.mark.parametrize("accum,checkpointing,metric", [(1, False, "cosine"), (2, True, "projection")])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("optim", OPTIMS)
def test_every_step_equals_the_batch_size_1_loop(tmp_path, optim, mode, accum, checkpointing, metric):
    model = MODES[mode]()
    danger, safety = _sets(model, mode)
    samples = random_samples(12, seed=31)
    start = copy.deepcopy(model)
    thetas = ThetaEachStep()
    name, optimizers = _optim(model, optim)
    trainer(model, samples, tmp_path, [SQSDCallback(danger, safety, metric=metric), thetas], accum=accum,
            steps=STEPS, optim=name, optimizers=optimizers, gradient_checkpointing=checkpointing).train()
    assert all(any(not torch.equal(thetas.theta[s][n], thetas.theta[s + 1][n]) for n in thetas.theta[s])
               for s in range(STEPS)), "an optimizer step left the parameters unchanged"
    assert_every_step_matches_loop(start, samples, tmp_path, thetas, danger, safety, metric, STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("flush_every", [1, 2])
def test_lora_taps_reduced_a_few_layers_at_a_time_every_step(tmp_path, monkeypatch, flush_every):
    """Five layers, so each module kind's set-aside factor gradients are reduced mid-backward (in batches of 2, 2
    and 1, or one by one) and at the pass end: under the default optimizer, accumulation 2 and checkpointing,
    every row still equals the loop at that step's θ."""
    monkeypatch.setattr(LoraHooks, "FLUSH_EVERY", flush_every)
    model = tiny_lora("llama", layers=5)
    danger, safety = three_sets(model)
    samples = random_samples(12, seed=32)
    start, thetas = copy.deepcopy(model), ThetaEachStep()
    callback = SQSDCallback(danger, safety)
    flushes = []
    monkeypatch.setattr(LoraHooks, "flush", lambda self, record, f=LoraHooks.flush: (flushes.append(
        len(self.pending)), f(self, record)))
    trainer(model, samples, tmp_path, [callback, thetas], accum=2, steps=STEPS, gradient_checkpointing=True).train()
    per_pass = 3 * -(-5 // flush_every)  # q, v, down_proj groups of 5 modules
    assert max(flushes) == flush_every and len(flushes) == STEPS * 2 * per_pass
    assert_every_step_matches_loop(start, samples, tmp_path, thetas, danger, safety, steps=STEPS)


@pytest.mark.parametrize("mode", list(MODES))
def test_bf16_direction_sets_are_held_in_bf16_and_every_step_equals_the_loop(tmp_path, mode):
    """Sets rounded to bf16 (``DirectionSet.to(dtype=torch.bfloat16)``, half the memory of fp32) stay bf16 in the
    engine's stacks and the drift's, and are used in fp32: under the default optimizer with accumulation 2, every
    step's rows equal the loop at that step's θ for the same rounded sets (1e-5), and the final drift equals the
    dense computation (1e-4)."""
    model = MODES[mode]()
    danger, safety = (([s.to(dtype=torch.bfloat16) for s in sets]) for sets in _sets(model, mode))
    samples = random_samples(12, seed=33)
    start, thetas = copy.deepcopy(model), ThetaEachStep()
    callback = SQSDCallback(danger, safety)
    trainer(model, samples, tmp_path, [callback, thetas], accum=2, steps=STEPS).train()
    stacks = [t for g in callback.run.engine.groups + callback.run.drift.groups if g.low for t in (g.VB, g.VAt)]
    assert stacks and all(t.dtype == torch.bfloat16 for t in stacks)
    assert all(d is None or all(t.dtype == torch.bfloat16 for t in d.tensors())
               for dirs in callback.run.bank.per_module.values() for d in dirs)
    assert_every_step_matches_loop(start, samples, tmp_path, thetas, danger, safety, steps=STEPS)
    before, after = trained_weights(start), trained_weights(model)
    assert_final_drift_is_dense(tmp_path, {m: after[m] - before[m] for m in after}, [*danger, *safety])


@pytest.mark.parametrize("mode", list(MODES))
def test_drops_at_every_step_equal_steps_on_the_kept_examples(tmp_path, mode):
    """Default optimizer, accumulation 2, clipping active, the riskier half of every micro-batch dropped: θ after
    every step equals the hand-written loop's on the kept examples (to 1e-3 × lr; Adam moves each weight by about
    lr), and every row's score (on which the drops were decided) equals the loop engine's at that step's θ. Full
    fine-tuning's gradients are tiny, so its AdamW steps near |g| ≈ eps: lr 1e-3 keeps rounding below tolerance."""
    model = MODES[mode]()
    danger, safety = _sets(model, mode)
    samples = random_samples(12, seed=41)
    start, reference = copy.deepcopy(model), copy.deepcopy(model)
    thetas = ThetaEachStep()
    kw = dict(accum=2, steps=STEPS, adam_epsilon=1e-6, lr=0.05 if mode == "lora" else 1e-3)
    trainer(model, samples, tmp_path, [SQSDCallback(danger, safety, drop_top_fraction=0.5), thetas],
            max_grad_norm=0.05, **kw).train()
    rows = read_jsonl(tmp_path / "sqsd" / "scores.jsonl")
    assert all(sum(r["dropped"] for r in rows if r["step"] == s) == 2 for s in range(STEPS))
    assert_every_step_matches_loop(start, samples, tmp_path, thetas, danger, safety, steps=STEPS)
    assert_steps_equal_kept_only(reference, samples, rows, tmp_path / "ref", thetas, max_grad_norm=0.05, **kw)
