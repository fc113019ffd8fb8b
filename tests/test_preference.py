"""SQSDCallback under TRL's DPOTrainer: each preference pair is one example, its update the one the pair's loss alone
would make (towards its chosen response, away from its rejected one), and other TRL trainers refused before step 1.

At every optimizer step of 3-step runs each row of scores.jsonl equals an independent float64 computation at that
step's parameters θ_s: the pair's DPO loss taken alone, e.g. −log σ(β[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) −
log π_ref(y_l))]) with log π summed over the completion's tokens and the reference the run's starting model (TRL's
frozen "ref" copy of a LoRA adapter, or a ``ref_model`` copy), its gradient by autograd, ΔW formed densely and
projected on the sets by tests/oracle.py. Tolerance: per step and key, max |row − oracle| ≤ 1e-5 × the key's scale
(sqsd_lab.tiny.score_scale: max |oracle| for a set's score, its terms' for danger, safety and sqsd). Drift against
dense math on θ_3 − θ_0 to 1e-4 (as the SFT tests)."""

import copy
import os
import re

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import TrainerControl, TrainerState

from sqsd_callback import SQSDCallback
from sqsd_callback.layers import find_targets
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.tiny import VOCAB, random_set, score_err, three_sets, tiny_full_ft, tiny_lora, word_tokenizer

from helpers import SCORE_KEYS, ThetaEachStep, assert_final_drift_is_dense, trainable, trained_weights, unchanged
from oracle import RefSet, at_theta, lora_scaling, score_row, trained

trl = pytest.importorskip("trl")
TRL_PASSES_LABELS = tuple(int(x) for x in re.findall(r"\d+", trl.__version__)[:2]) >= (1, 15)
needs_labels = pytest.mark.skipif(not TRL_PASSES_LABELS, reason=(
    f"TRL {trl.__version__}'s DPOTrainer computes log-probabilities from the logits without passing labels to the "
    f"model; SQSDCallback refuses it (test_dpo_before_trl_1_15_is_refused_before_step_1)"))
TOL = 1e-5
LOSSES = {
    "sigmoid": lambda c, r, beta: -nn.functional.logsigmoid(beta * (c - r)),
    "sppo_hard": lambda c, r, beta: (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2,
}
"""Each DPO loss type the runs use, as a function of the pair's log-ratios log π − log π_ref (chosen c, rejected
r), written from the papers' formulas (TRL's dpo_trainer.py has the same)."""


def _pairs(n: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    words = lambda k: " ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (k,), generator=g))  # noqa: E731
    size = lambda: int(torch.randint(2, 6, (1,), generator=g))  # noqa: E731
    return Dataset.from_list([{"prompt": words(size()), "chosen": " " + words(size()),
                               "rejected": " " + words(size())} for _ in range(n)])


def _dpo(tmp_path, model, callbacks, n: int = 12, ref_model=None, **kw):
    """A DPOTrainer over ``n`` random pairs, fp32 on CPU, logging every step, no checkpoints."""
    from trl import DPOConfig, DPOTrainer
    args = DPOConfig(**{**dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                               learning_rate=0.05, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                               bf16=False, gradient_checkpointing=False, seed=5, disable_tqdm=True), **kw})
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=_pairs(n),
                      processing_class=word_tokenizer(), callbacks=list(callbacks))


def _log_prob(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log π(completion | prompt): the completion tokens' log-probabilities summed, the sequence alone."""
    ids = torch.tensor([prompt + completion])
    logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return logp.gather(-1, ids[0, 1:, None])[len(prompt) - 1:].sum()


def _pair_update(policy, reference, pair: dict, beta: float, losses: list[str], weights: list[float]) -> dict:
    """ΔW_m (float64, out×in) of every trained module for one pair's DPO loss alone, ``policy`` and ``reference``
    float64 models: −s(gB A + B gA) for LoRA, −∂loss/∂W in full fine-tuning."""
    p, c, r = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
    with torch.no_grad():
        ref_c, ref_r = _log_prob(reference, p, c), _log_prob(reference, p, r)
    c_ratio, r_ratio = _log_prob(policy, p, c) - ref_c, _log_prob(policy, p, r) - ref_r
    loss = sum(w * LOSSES[t](c_ratio, r_ratio, beta) for t, w in zip(losses, weights))
    params = trained(policy)
    grads = iter(torch.autograd.grad(loss, [t for ps in params.values() for t in ps]))
    peft_config = getattr(policy, "peft_config", None)
    out = {}
    for m, ps in params.items():
        if peft_config:
            (A, B), gA, gB = ps, next(grads), next(grads)
            out[m] = -lora_scaling(next(iter(peft_config.values())), m) * (gB @ A.detach() + B.detach() @ gA)
        else:
            out[m] = -next(grads)
    return out


def _ref_sets(sets) -> list[RefSet]:
    return [RefSet(s.kind, s.name, {m: d.materialize().double() for m, d in s.modules.items()}) for s in sets]


# ------------------------------------------------------------------ every step against the batch-size-1 pair loss
@needs_labels
@pytest.mark.parametrize("mode,accum,checkpointing,metric,losses", [
    ("lora", 1, False, "cosine", ["sigmoid"]),
    pytest.param("lora", 2, True, "projection", ["sigmoid"], marks=pytest.mark.slow),
    pytest.param("lora", 1, False, "projection", ["sigmoid", "sppo_hard"], marks=pytest.mark.slow),
    pytest.param("full", 1, False, "projection", ["sigmoid"], marks=pytest.mark.slow),
])
def test_every_dpo_step_scores_each_pair_as_its_loss_alone(tmp_path, mode, accum, checkpointing, metric, losses):
    """Rows are pairs (B per micro-batch, each named by its dataset position), scored at every step as the pair's
    loss alone at θ_s. LoRA's reference is TRL's frozen copy of the adapter, full fine-tuning's a ``ref_model``
    copy. Accumulation 2 runs one epoch of 10 pairs, so its last step has one micro-batch, not two (the Trainer
    divides that step's loss by 1): projection, the scale-sensitive metric, checks each pair's share. The mixed
    loss (sigmoid + ½·sppo_hard) weighs a pair's chosen and rejected rows unequally."""
    model = tiny_lora("llama") if mode == "lora" else tiny_full_ft("llama")
    danger, safety = three_sets(model)
    start, thetas = copy.deepcopy(model), ThetaEachStep()
    weights = [1.0, 0.5][:len(losses)]
    kw = dict(n=10, num_train_epochs=1, max_steps=-1) if accum == 2 else {}
    if mode == "full":  # TRL would load the reference from the model's Hub name, which a random model has not
        kw.update(ref_model=copy.deepcopy(model), learning_rate=1e-3)
    trainer = _dpo(tmp_path, model, [SQSDCallback(danger, safety, metric=metric), thetas], loss_type=losses,
                   loss_weights=weights, gradient_accumulation_steps=accum, gradient_checkpointing=checkpointing, **kw)
    trainer.train()
    rows, data = read_jsonl(tmp_path / "sqsd" / "scores.jsonl"), trainer.train_dataset
    per_step = [2 * accum, 2 * accum, 2] if accum == 2 else [2, 2, 2]
    assert [sum(r["step"] == s for r in rows) for s in range(3)] == per_step
    indices = [r["index"] for r in rows]  # one epoch at most: each pair once, found by its tokens
    assert len(set(indices)) == len(indices) and set(indices) <= set(range(len(data)))
    ref, names = _ref_sets([*danger, *safety]), set(trainable(start))
    reference, worst = at_theta(start), 0.0
    for s in range(3):
        assert any(not torch.equal(thetas.theta[s][n], thetas.theta[s + 1][n]) for n in names), f"step {s} stood"
        got = [r for r in rows if r["step"] == s]
        policy = at_theta(start, {n: v for n, v in thetas.theta[s].items() if n in names})
        want = [score_row(_pair_update(policy, reference, data[r["index"]], trainer.args.beta, losses, weights), ref,
                          metric)[0] for r in got]
        errs = {k: score_err(got, want, k) for k in SCORE_KEYS}
        assert max(errs.values()) <= TOL, f"step {s}: {errs}"
        worst = max(worst, *errs.values())
    print(f"agreement {os.environ.get('PYTEST_CURRENT_TEST', '')}: {worst:.2e}")
    before, after = trained_weights(start), trained_weights(model)
    assert_final_drift_is_dense(tmp_path, {m: after[m] - before[m] for m in after}, [*danger, *safety])


@needs_labels
def test_dpo_at_its_default_lr_from_a_trained_adapter_has_exact_drift(tmp_path):
    """DPOConfig's default lr (1e-6) from an adapter whose B is not zero (DPO after SFT): each step changes the
    merged delta by about 1e-6 of its size. The drift then equals float64 dense math on θ_3 − θ_0 (1e-4); the fp32
    expansion θ_t's minus θ_0's terms gave cosines 5× too small at step 1 and a negative ‖θ_2 − θ_0‖², which
    stopped the run."""
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    start = copy.deepcopy(model)
    _dpo(tmp_path, model, [SQSDCallback(danger, safety)], learning_rate=1e-6).train()

    def merged(m):
        return {k: t.scaling * t.B.detach().double() @ t.A.detach().double() for k, t in find_targets(m).items()}
    before, after = merged(start), merged(model)
    assert len(read_jsonl(tmp_path / "sqsd" / "drift.jsonl")) == 3
    assert_final_drift_is_dense(tmp_path, {m: after[m] - before[m] for m in after}, [*danger, *safety])


# ------------------------------------------------------------------ refused before step 1
def _begin(callback: SQSDCallback, args, model) -> None:
    """The callback's train-begin event as the Trainer sends it, with no data."""
    callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)


def _trl_config(name: str, tmp_path, **kw):
    """TRL's config class ``name`` from trl or trl.experimental (where TRL 1.x moved ORPO, CPO and GKD)."""
    import importlib
    for module in ("trl", f"trl.experimental.{name[:-len('Config')].lower()}"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
        if cls is not None:
            return cls(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kw)
    pytest.skip(f"TRL {trl.__version__} has no {name}")


@pytest.mark.parametrize("name", ["KTOConfig", "ORPOConfig", "CPOConfig", "GRPOConfig", "RewardConfig", "GKDConfig"])
def test_other_trl_trainers_are_refused_before_step_1(tmp_path, name):
    """Their losses are not each example's mean cross-entropy nor a DPO pair's; GKDConfig subclasses SFTConfig but
    trains on a divergence from a teacher."""
    model = tiny_lora("llama")
    with pytest.raises(ValueError, match=f"{name}: .*Train with one of those"):
        _begin(SQSDCallback(*three_sets(model)), _trl_config(name, tmp_path), model)


@needs_labels
@pytest.mark.slow
def test_kto_trainer_is_refused_before_step_1(tmp_path):
    """A real KTOTrainer run: refused at train begin, the parameters untouched."""
    from trl import KTOConfig, KTOTrainer
    model = tiny_lora("llama")
    start = trainable(model)
    pairs = _pairs(4)
    data = Dataset.from_list([{"prompt": p, "completion": c, "label": c == ch} for p, ch, rj in
                              zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]) for c in (ch, rj)])
    args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to=[],
                     save_strategy="no", use_cpu=True, bf16=False, gradient_checkpointing=False)
    trainer = KTOTrainer(model=model, args=args, train_dataset=data, processing_class=word_tokenizer(),
                         callbacks=[SQSDCallback(*three_sets(model))])
    with pytest.raises(ValueError, match="KTOConfig: KTO compares each example's reward with a KL estimate"):
        trainer.train()
    assert unchanged(model, start)


@needs_labels
@pytest.mark.parametrize("options,config,match", [
    ({"loss_type": ["aot"]}, {}, r"\['aot'\] couple the pairs"),
    ({"loss_type": ["sigmoid", "sft"]}, {}, r"\['sft'\] couple the pairs"),
    ({"router_aux_loss_coef": 0.01}, {}, "router_aux_loss_coef=0.0"),
    ({}, {"engine": "vmap"}, "Use engine='hooks' with DPOTrainer"),
    ({}, {"drop_above": 0.5}, "Drops and the anchor are not supported under DPOTrainer"),
    ({}, {"anchor": True}, "Drops and the anchor are not supported under DPOTrainer"),
])
def test_dpo_options_a_pair_score_cannot_follow_are_refused_before_step_1(tmp_path, options, config, match):
    """Loss types that couple a batch's pairs, a MoE router loss, the oracle engines, drops and the anchor."""
    model = tiny_lora("llama")
    if "router_aux_loss_coef" in options:
        model.config.output_router_logits = False  # what a mixture-of-experts config declares
    danger, safety = three_sets(model)
    if config.pop("anchor", False):
        config["anchor"] = random_set(model, "safety", "aligned", seed=9)
    with pytest.raises(ValueError, match=match):
        _begin(SQSDCallback(danger, safety, **config), _trl_config("DPOConfig", tmp_path, **options), model)


def test_dpo_before_trl_1_15_is_refused_before_step_1(tmp_path, monkeypatch):
    """TRL ≤ 1.14 computes DPO's log-probabilities from the logits without passing labels to the model (checked on
    0.24, 1.0–1.9 and 1.13; 1.15 passes them)."""
    import sqsd_callback.runtime.preference as preference
    if TRL_PASSES_LABELS:
        monkeypatch.setattr(preference, "version", lambda name: "1.14.0")
    model = tiny_lora("llama")
    with pytest.raises(ValueError, match=r"DPOTrainer computes the log-probabilities from the logits itself.*"
                                         r"trl>=1\.15"):
        _begin(SQSDCallback(*three_sets(model)), _trl_config("DPOConfig", tmp_path), model)
