"""The fast hooks engine against the two oracles (torch.func per-example gradients, batch-size-1 loop).

Tolerance: per score key, max |hooks − oracle| over examples ≤ 1e-5 × the key's scale (fp32 models):
max |oracle| for a set's score; danger, safety and sqsd = danger − safety against their terms' (testing.score_scale)."""

import pytest
import torch

from sqsd_callback import score_samples
from sqsd_callback.bank import DirectionBank
from sqsd_callback.engines import make_engine
from sqsd_callback.layers import lora_targets
from sqsd_callback.types import collate
from sqsd_lab.tiny import VOCAB, random_samples, random_set, score_err, three_sets, tiny_lora

from helpers import SCORE_KEYS


def _agree(model, danger, safety, samples, metric, keys=SCORE_KEYS, batch_size=8):
    ref = score_samples(model, samples, danger, safety, metric=metric, engine="loop", progress=False)
    for engine in ("hooks", "vmap"):
        got = score_samples(model, samples, danger, safety, metric=metric, engine=engine,
                            batch_size=batch_size, progress=False)
        assert [r["index"] for r in got] == [r["index"] for r in ref]
        for k in keys:
            err = score_err(got, ref, k)
            assert err < 1e-5, (engine, metric, k, err)
    return ref


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("metric", ["cosine", "projection", "global_cosine"])
def test_engines_agree_with_padding_and_three_sets(arch, metric):
    model = tiny_lora(arch)
    danger, safety = three_sets(model)
    samples = random_samples(10, seed=4)
    samples[3]["attention_mask"][:2] = [0, 0]  # left-padded example inside the batch
    ref = _agree(model, danger, safety, samples, metric, batch_size=4)
    assert len({round(r["sqsd"], 6) for r in ref}) == len(ref)  # examples really differ


def test_engines_agree_rslora_all_linear_and_partial_directions():
    model = tiny_lora("qwen2", targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                       "down_proj"], r=8, rslora=True)
    danger = [random_set(model, "danger", "attn", seed=5, modules=["self_attn"])]
    safety = [random_set(model, "safety", "mlp", rank=None, seed=6, modules=["mlp", "q_proj"])]
    with pytest.warns(UserWarning, match="covers"):
        _agree(model, danger, safety, random_samples(6, seed=7), "cosine",
               keys=["danger", "safety", "sqsd", "danger/attn", "safety/mlp"])


def test_low_rank_identities_match_dense_math_per_module():
    """Per module, not only summed: the hooks engine's dots and squared norms equal the dense oracle's."""
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    targets = lora_targets(model)
    bank = DirectionBank(danger + safety, {m: t.shape for m, t in targets.items()})
    batch = collate(random_samples(5, seed=8))
    fast = make_engine("hooks", targets, bank).compute(model, batch)
    slow = make_engine("loop", targets, bank).compute(model, batch)
    assert torch.allclose(fast.dots, slow.dots, rtol=1e-5, atol=1e-5 * slow.dots.abs().max().item())
    assert torch.allclose(fast.sq, slow.sq, rtol=1e-5, atol=0)


def test_hand_computed_single_module_case():
    """One LoRA module, one token scored: ΔW = −s(gB A + B gA) with gradients from autograd by hand."""
    model = tiny_lora("llama", targets=["v_proj"])
    targets = lora_targets(model)
    name = "model.layers.1.self_attn.v_proj"
    t = targets[name]
    V = torch.randn(t.shape, generator=torch.Generator().manual_seed(3))
    from sqsd_callback import DirectionSet
    from sqsd_callback.types import Direction
    ds = DirectionSet({name: Direction(dense=V)}, "danger", "one")
    sample = {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, -100, 8]}
    loss = model(input_ids=torch.tensor([sample["input_ids"]]), labels=torch.tensor([sample["labels"]])).loss
    gA, gB = torch.autograd.grad(loss, [t.A, t.B])
    dW = -t.scaling * (gB @ t.A + t.B @ gA)
    dW = dW.detach()
    expected = float((dW * V).sum() / (dW.norm() * V.norm()))
    with pytest.warns(UserWarning, match="covers 1 of the model.s 2"):
        row = score_samples(model, [sample], [ds], [], progress=False)[0]
    assert row["danger"] == pytest.approx(expected, rel=1e-5)
    assert row["safety"] is None and row["sqsd"] == pytest.approx(expected, rel=1e-5)


def test_unscored_example_gets_null_scores_and_others_are_unaffected():
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    samples = random_samples(4, seed=9)
    samples[2]["labels"] = [-100] * len(samples[2]["labels"])
    rows = score_samples(model, samples, danger, safety, progress=False)
    assert all(rows[2][k] is None for k in SCORE_KEYS)
    alone = score_samples(model, [samples[0]], danger, safety, progress=False)[0]
    assert rows[0]["sqsd"] == pytest.approx(alone["sqsd"], rel=1e-5)


def test_output_layer_sees_only_scored_positions_and_a_batch_with_none_scores_null():
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    samples = random_samples(3, seed=4)
    samples[1]["labels"] = [-100] * len(samples[1]["labels"])
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    rows = score_samples(model, samples, danger, safety, batch_size=3, progress=False)
    handle.remove()
    scored = sum(sum(t != -100 for t in s["labels"][1:]) for s in samples)
    hidden = model.config.hidden_size
    assert seen[0] == torch.Size([1, 1, hidden])  # the one-token check that the logits are the layer's own
    assert [s for s in seen[1:] if s.numel()] == [torch.Size([scored, hidden])]
    loop = score_samples(model, samples, danger, safety, engine="loop", progress=False)
    assert score_err(rows, loop, "sqsd") < 1e-5
    none = score_samples(model, [samples[1]], danger, safety, progress=False)[0]
    assert all(none[k] is None for k in SCORE_KEYS)


@pytest.mark.parametrize("chunk_bytes", [None, 4 * VOCAB * 5])
def test_output_layer_logits_in_chunks_score_like_the_loop(monkeypatch, chunk_bytes):
    """The scored positions' logits a few at a time (5 positions per chunk here), each chunk's loss gradient formed
    and sent back through the output layer at once: offline memory then does not grow with scored tokens ×
    vocabulary, the backward recomputes no chunk, and the scores stay the loop's (1e-5)."""
    from sqsd_callback.engines import losses
    if chunk_bytes is not None:
        monkeypatch.setattr(losses, "HEAD_CHUNK_BYTES", chunk_bytes)
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    samples = random_samples(6, seed=22)
    rows = []  # positions the output layer ran on, per call
    handle = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    score_samples(model, samples, danger, safety, batch_size=6, progress=False)
    handle.remove()
    chunks = [n for n in rows[1:] if n]  # after the one-token check that the logits are the layer's own
    scored = sum(sum(t != -100 for t in s["labels"][1:]) for s in samples)
    assert sum(chunks) == scored  # every scored position once: nothing recomputed
    assert (max(chunks) == 5 and len(chunks) > 2) if chunk_bytes else chunks == [scored]
    _agree(model, danger, safety, samples, "cosine")


def test_a_bf16_model_scores_offline_like_the_loop_in_bf16():
    """The chunked output-layer gradient in a bf16 model (bf16 logits, softmax in fp32) runs and agrees with the
    batch-size-1 loop run in bf16 to bf16's resolution: 3e-2 relative, 1.1e-2 seen (both take the backward in bf16,
    summed in another order). It would catch a gross error, not the rounding of one product."""
    model = tiny_lora("llama").to(torch.bfloat16)
    danger, safety = three_sets(model)
    samples = random_samples(6, seed=23)
    got = score_samples(model, samples, danger, safety, batch_size=6, progress=False)
    want = score_samples(model, samples, danger, safety, engine="loop", progress=False)
    for k in SCORE_KEYS:
        assert score_err(got, want, k) < 3e-2, k


def test_a_scored_output_layer_and_soft_capped_logits_score_like_the_loop():
    """Full fine-tuning whose output layer is trained (so scored): it runs on every position, as in training (the
    old code fed it the scored positions only and crashed); and a model that soft-caps its logits after the output
    layer (Gemma 2) is never chunked, since the layer's output is not its logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from sqsd_callback.engines.losses import output_layer
    from sqsd_callback.layers import find_targets
    from sqsd_lab.tiny import tiny_base

    model = tiny_base("llama")
    assert "lm_head" in find_targets(model)
    assert output_layer(model, find_targets(model)) == (None, False)
    danger = [random_set(model, "danger", "d1", rank=2, seed=1)]
    _agree(model, danger, [], random_samples(6, seed=23), "cosine", keys=["sqsd"])
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=8, final_logit_softcapping=0.5, pad_token_id=0,
                                           attn_implementation="eager"))
    for name, p in gemma.named_parameters():
        p.requires_grad_("proj" in name)
    head, chunked = output_layer(gemma, find_targets(gemma))
    assert head is gemma.lm_head and not chunked
    danger = [random_set(gemma, "danger", "d1", rank=2, seed=1)]
    _agree(gemma, danger, [], random_samples(6, seed=24), "cosine", keys=["sqsd"])


def test_engines_agree_under_sdpa_attention():
    """transformers' SDPA mask building branches on the mask's values, which vmap cannot trace: the oracles run
    each example with its tokens first and no mask."""
    model = tiny_lora("llama", attn="sdpa")
    danger, safety = three_sets(model)
    _agree(model, danger, safety, random_samples(5, seed=21), "cosine")


def test_score_samples_leaves_model_state_as_found():
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    model.train()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    lora[0].requires_grad_(False)
    for p in lora[1:]:
        p.grad = torch.full_like(p, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for engine in ("hooks", "vmap", "loop"):
        score_samples(model, random_samples(3), danger, safety, engine=engine, progress=False)
    assert model.training and all(m.training for m in model.modules())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n]
    assert lora[0].grad is None and all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in lora[1:])
    assert not any(m._forward_hooks for m in model.modules())


def test_bad_engine_metric_and_samples():
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    with pytest.raises(ValueError, match="Unknown engine 'fast'.*hooks"):
        score_samples(model, random_samples(2), danger, safety, engine="fast", progress=False)
    with pytest.raises(ValueError, match="Unknown metric 'cos'.*cosine"):
        score_samples(model, random_samples(2), danger, safety, metric="cos", progress=False)
    with pytest.raises(ValueError, match="no \\['labels'\\]"):
        score_samples(model, [{"input_ids": [1, 2, 3]}], danger, safety, progress=False)
    with pytest.raises(ValueError, match="got no samples"):
        score_samples(model, [], danger, safety, progress=False)


def test_rows_come_back_in_input_order_whatever_the_length_grouping():
    """Batches group samples by length; rows still follow the input, each equal to scoring the sample alone."""
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    samples = random_samples(9, seed=12, min_len=4, max_len=20)
    lengths = [len(s["input_ids"]) for s in samples]
    assert lengths != sorted(lengths)
    alone = [score_samples(model, [s], danger, safety, progress=False)[0] for s in samples]
    got = score_samples(model, samples, danger, safety, batch_size=4, progress=False)
    assert [r["index"] for r in got] == list(range(9))
    for k in SCORE_KEYS:
        assert score_err(got, alone, k) < 1e-5, k


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_modules_grouped_by_layout_score_like_the_loop(kind):
    """Layers of one kind are scored as a stack: a set that is dense in one layer and low-rank in another,
    low-rank sets of different ranks side by side, and a set absent from some layers, each module's dots and
    squared norm still equal the batch-size-1 loop's (tolerance 1e-5 of the largest)."""
    from sqsd_callback import DirectionSet
    from sqsd_callback.layers import find_targets
    from sqsd_callback.types import Direction
    from sqsd_lab.tiny import tiny_full_ft

    model = tiny_lora("llama", targets=["q_proj", "k_proj", "v_proj", "up_proj"]) if kind == "lora" else \
        tiny_full_ft("llama", ["q_proj", "k_proj", "v_proj", "up_proj"])
    targets = find_targets(model)
    g = torch.Generator().manual_seed(11)

    def low(m, q):
        out, inp = targets[m].shape
        return Direction(B=torch.randn(out, q, generator=g), A=torch.randn(q, inp, generator=g))

    mixed = DirectionSet({m: Direction(dense=torch.randn(targets[m].shape, generator=g)) if ".0." in m else low(m, 2)
                          for m in targets}, "danger", "mixed")
    wide = DirectionSet({m: low(m, 5) for m in targets}, "danger", "wide")
    some = DirectionSet({m: low(m, 1) for m in targets if "k_proj" not in m}, "safety", "some")
    with pytest.warns(UserWarning, match="covers"):
        bank = DirectionBank([mixed, wide, some], {m: t.shape for m, t in targets.items()})
    batch = collate(random_samples(5, seed=13))
    fast = make_engine("hooks", targets, bank).compute(model, batch)
    slow = make_engine("loop", targets, bank).compute(model, batch)
    assert len(make_engine("hooks", targets, bank).groups) == 8  # q, k, v, up; layer 0 ('mixed' dense) apart
    assert torch.allclose(fast.dots, slow.dots, rtol=0, atol=1e-5 * slow.dots.abs().max().item())
    assert torch.allclose(fast.sq, slow.sq, rtol=1e-5, atol=0)


def test_training_pass_with_lora_dropout_scores_the_gradients_it_made():
    """In train mode with lora_dropout the masks are part of each example's gradient: the engine's kept
    per-example gradients sum to the pass's own .grad, and its dots and norms equal the dense math on them
    (tolerance 1e-5 of the largest)."""
    from sqsd_callback.engines.losses import dense_stats, example_mean_losses

    model = tiny_lora("llama", targets=["q_proj", "v_proj", "up_proj", "down_proj"], dropout=0.5)
    danger, safety = three_sets(model)
    targets = lora_targets(model)
    bank = DirectionBank(danger + safety, {m: t.shape for m, t in targets.items()})
    engine = make_engine("hooks", targets, bank, keep_grads=True)
    batch = collate(random_samples(5, seed=14))
    model.train()
    engine.attach()
    engine.start(batch)
    example_mean_losses(model(**batch.model_inputs()).logits, batch.labels).sum().backward()
    stats = engine.finish()
    per_example = {}
    for group in engine.groups:
        for t, (gA, gB) in zip(group.targets, group.kept):
            per_example[t.name] = (gA, gB)
            for p, g in zip(t.params, (gA, gB)):
                assert torch.allclose(g.sum(0), p.grad, rtol=0, atol=1e-5 * p.grad.abs().max().item())
    engine.detach()
    ref = dense_stats(per_example, targets, bank)
    assert torch.allclose(stats.dots, ref.dots, rtol=0, atol=1e-5 * ref.dots.abs().max().item())
    assert torch.allclose(stats.sq, ref.sq, rtol=1e-5, atol=0)
    no_masks = make_engine("loop", targets, bank).compute(model, batch)
    assert not torch.allclose(stats.dots, no_masks.dots, rtol=1e-2)  # the masks mattered


def test_length_batches_respect_count_and_token_budget():
    from sqsd_callback.offline import length_batches
    lengths = [5, 100, 6, 7, 50, 300]
    assert length_batches(lengths, 3) == [[0, 2, 3], [4, 1, 5]]  # by length, 3 at most
    # budget 120 padded tokens: 5,6,7 (3×7 = 21); with 50 it would be 4×50 = 200 > 120, so 50 starts a batch;
    # 50 with 100 would be 2×100 = 200, so 100 starts one; 300 is over the budget and goes alone
    assert length_batches(lengths, 8, max_tokens=120) == [[0, 2, 3], [4], [1], [5]]
    with pytest.raises(ValueError, match="must be positive"):
        length_batches(lengths, 0)


def test_token_budget_changes_batches_not_scores():
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    samples = random_samples(8, seed=5, min_len=6, max_len=30)
    whole = score_samples(model, samples, danger, safety, progress=False)
    budget = score_samples(model, samples, danger, safety, progress=False, max_tokens=40)
    assert score_err(budget, whole, "sqsd") < 1e-5
