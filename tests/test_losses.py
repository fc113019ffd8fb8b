"""Training losses other than the model's own mean cross-entropy: refused before the first optimizer step where the
per-example scores cannot follow them; a Trainer whose compute_loss builds its own loss from the logits is scored
exactly by an extra pass, and drops and the anchor, which could not act on that step's gradients, are refused."""

import types
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import MixtralConfig, MixtralForCausalLM

from sqsd_callback import SQSDCallback
from sqsd_callback.runtime.recorder import refuse_losses
from sqsd_lab.tiny import VOCAB, random_samples, three_sets, tiny_lora

from helpers import ThetaEachStep, assert_every_step_matches_loop, at, trainable, trainer, unchanged


def test_label_smoothing_is_refused_by_name_before_the_first_step(tmp_path):
    """The Trainer takes the labels out of the batch to smooth the loss itself; the old code failed at the first
    forward saying the batches lacked labels."""
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    start = trainable(model)
    run = trainer(model, random_samples(8, seed=1), tmp_path, [SQSDCallback(danger, safety)], accum=2,
                  label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1"):
        run.train()
    assert unchanged(model, start)


def test_a_router_load_balancing_loss_is_refused_before_the_first_step(tmp_path):
    """Mixtral's auxiliary loss couples a batch's examples (the old code was 4e-2 off the loop at coef 0.02)."""
    torch.manual_seed(0)
    base = MixtralForCausalLM(MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                            num_local_experts=2, num_experts_per_tok=1, pad_token_id=0,
                                            output_router_logits=True, router_aux_loss_coef=0.02))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    danger, safety = three_sets(model)
    start = trainable(model)
    with pytest.raises(ValueError, match="output_router_logits"):
        trainer(model, random_samples(8, seed=2), tmp_path, [SQSDCallback(danger, safety)], accum=2).train()
    assert unchanged(model, start)


def test_neftune_is_named_as_scoring_the_noisy_step():
    assert refuse_losses(types.SimpleNamespace(neftune_noise_alpha=5.0), torch.nn.Linear(1, 1))[0].startswith(
        "neftune_noise_alpha=5.0")
    assert refuse_losses(types.SimpleNamespace(neftune_noise_alpha=None), torch.nn.Linear(1, 1)) == []


def _own_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """Each example's mean token loss averaged over the batch, from the logits: the model's own loss goes unused."""
    out = model(**inputs)
    logits, labels = out.logits[:, :-1].float(), inputs["labels"][:, 1:]
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    scored = (labels != -100).float()
    loss = ((tok * scored).sum(-1) / scored.sum(-1).clamp(min=1)).mean() / self.args.gradient_accumulation_steps
    return (loss, out) if return_outputs else loss


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["cosine", "projection"])
def test_a_compute_loss_of_its_own_is_scored_exactly_at_every_step(tmp_path, metric):
    """Rescored by an extra pass at each step's parameters (default optimizer, accumulation 2, 1e-5 against the
    loop); the old code also warned, wrongly, that projections were not per example."""
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    samples, start, thetas = random_samples(12, seed=41), at(model, {}), ThetaEachStep()
    run = trainer(model, samples, tmp_path, [SQSDCallback(danger, safety, metric=metric), thetas], accum=2)
    run.compute_loss = types.MethodType(_own_loss, run)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run.train()
    said = [str(w.message) for w in seen]
    assert any("extra forward and backward pass" in s for s in said)
    assert not any("could not read the loss weights" in s for s in said)
    assert_every_step_matches_loop(start, samples, tmp_path, thetas, danger, safety, metric=metric)


def test_drops_under_a_compute_loss_of_their_own_are_refused_before_the_first_optimizer_step(tmp_path):
    """The old code never dropped an example there, and logged sqsd/dropped = 0."""
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    start = trainable(model)
    run = trainer(model, random_samples(12, seed=41), tmp_path,
                  [SQSDCallback(danger, safety, drop_top_fraction=0.5)], accum=2)
    run.compute_loss = types.MethodType(_own_loss, run)
    with pytest.raises(RuntimeError, match="did not pass through the model's own loss"):
        run.train()
    assert run.state.global_step == 0 and unchanged(model, start)
