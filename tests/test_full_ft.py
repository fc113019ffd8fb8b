"""Full fine-tuning (plain Linear layers): hooks against the vmap and loop oracles, in training, drift and drops.

Tolerance as for LoRA: per score key, max |hooks − oracle| ≤ 1e-5 × the key's scale (testing.score_scale; fp32)."""

import copy
import math

import pytest
import torch

from sqsd_callback import SQSDCallback, score_samples
from sqsd_callback.bank import DirectionBank
from sqsd_callback.directions import DirectionSet
from sqsd_callback.drift import Drift
from sqsd_callback.layers import LinearTarget, find_targets
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.tiny import random_samples, random_set, score_err, tiny_base, tiny_full_ft

from helpers import SCORE_KEYS, ThetaEachStep, assert_every_step_matches_loop, assert_final_drift_is_dense, trainer

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
            assert score_err(got, ref, k) < 1e-5, (engine, k)


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
        assert score_err(first, [expected[r["index"]] for r in first], k) < 1e-5, k
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
    assert score_err(got, ref, "safety") < 1e-5
    assert all(r["sqsd"] == pytest.approx(-r["safety"]) for r in got)
    assert torch.isfinite(torch.tensor([r["safety"] for r in got])).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sampled_drift_keeps_projections_exact_and_estimates_the_norm_from_its_lattice(tmp_path, arch):
    """drift_sample=4 (stride 5 on these even rows) at every step of a run under the default optimizer (AdamW,
    accumulation 2): projections equal the dense <θ_s − θ_0, V>/‖V‖ (rel 1e-5: fp32 logging of fp64 dots), the norm
    is the lattice estimate computed here from θ_s and θ_0 in the weights' storage order (rel 1e-5), and cosines
    are the projections over it."""

    if arch == "gpt2":
        model = tiny_base("gpt2", 0)
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".weight") and any(m in name for m in ("c_attn", "c_fc", "attn.c_proj")))
    else:
        model = full_ft()
    danger, safety = sets(model)
    samples, thetas = random_samples(12, seed=9), ThetaEachStep()
    trainer(model, samples, tmp_path, [SQSDCallback(danger, safety, drift_sample=4), thetas], accum=2,
            lr=1e-3).train()
    rows = read_jsonl(tmp_path / "sqsd" / "drift.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        theta, start = thetas.theta[row["step"]], thetas.theta[0]
        sq, delta = {}, {}
        for m in find_targets(model):
            w, w0 = theta[f"{m}.weight"].double(), start[f"{m}.weight"].double()
            delta[m] = (w - w0).T if arch == "gpt2" else w - w0  # Conv1D stores in×out
            stride = next(s for s in range(4, 100) if math.gcd(s, w.shape[-1]) == 1)
            kept = (w - w0).reshape(-1)[::stride]
            sq[m] = float(kept.pow(2).sum()) * w.numel() / kept.numel()
        assert row["norm"] == pytest.approx(math.sqrt(sum(sq.values())), rel=1e-5)
        exact = math.sqrt(sum(float(d.pow(2).sum()) for d in delta.values()))
        assert row["norm"] == pytest.approx(exact, rel=0.5)  # an estimate, from a fifth of the entries
        for s in danger + safety:
            key = f"{s.kind}/{s.name}"
            vs = {m: v.materialize().double() for m, v in s.modules.items()}
            v_norm = math.sqrt(sum(float(v.pow(2).sum()) for v in vs.values()))
            proj = sum(float((delta[m] * v).sum()) for m, v in vs.items()) / v_norm
            assert row[f"projection/{key}"] == pytest.approx(proj, rel=1e-5), (row["step"], key)
            w_norm = math.sqrt(sum(sq[m] for m in s.modules))
            assert row[f"cosine/{key}"] == pytest.approx(proj / w_norm, rel=1e-5), (row["step"], key)


def test_a_sampled_drift_state_resumes_only_with_the_same_drift_sample():
    """θ_0 kept at a lattice of entries round-trips through the checkpoint state; another drift_sample is refused."""
    model = full_ft()
    danger, safety = sets(model)
    targets = find_targets(model)
    bank = DirectionBank(danger + safety, {m: t.shape for m, t in targets.items()})
    drift = Drift(targets, bank, sample=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = drift.measure()
    state = {k: v.clone() for k, v in drift.state_tensors().items()}
    resumed = Drift(targets, bank, sample=4)  # its own start is the moved weights, until the state is loaded
    resumed.load_state_tensors(state)
    assert resumed.measure() == before
    with pytest.raises(ValueError, match="drift_sample"):
        Drift(targets, bank).load_state_tensors(state)


def test_a_tied_output_layer_is_left_out_and_every_step_matches_the_loop(tmp_path):
    """Full fine-tuning of a model whose output layer shares the input embedding (tie_word_embeddings, as in
    SmolLM2): the shared weight's gradient also flows through the embedding lookup, which the Linear taps cannot
    see, so scoring lm_head gave scores up to 0.37 off the loop from step 0. It is left out with a warning; every
    step's rows then equal the loop at that step's parameters (default optimizer, accumulation 2, 1e-5), and exact
    drops are refused before training, since the tied weight trains outside the scored ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sqsd_lab.tiny import VOCAB

    def tiny(tied):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                            attn_implementation="eager", tie_word_embeddings=tied))

    model = tiny(True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = tiny(False)  # the same modules with lm_head its own: sets that cover it, as users' sets may
    danger = [random_set(untied, "danger", "d1", rank=3, seed=1), random_set(untied, "danger", "d2", rank=None, seed=2)]
    safety = [random_set(untied, "safety", "s1", rank=2, seed=3)]
    assert all("lm_head" in s.modules for s in danger + safety)
    with pytest.warns(UserWarning, match="lm_head: the weight is tied"):
        assert "lm_head" not in find_targets(model)
    samples, start = random_samples(12, seed=31), copy.deepcopy(model)
    thetas = ThetaEachStep()
    with pytest.warns(UserWarning, match="tied"):
        trainer(model, samples, tmp_path / "run", [SQSDCallback(danger, safety), thetas], accum=2, steps=3,
                lr=1e-3).train()
    assert_every_step_matches_loop(start, samples, tmp_path / "run", thetas, danger, safety)
    with pytest.raises(ValueError, match="also trains .*embed_tokens"):
        trainer(copy.deepcopy(start), samples, tmp_path / "drops",
                [SQSDCallback(danger, safety, drop_top_fraction=0.5)], accum=2, steps=1, lr=1e-3).train()
