"""DirectionSet loading, saving and validation, with the messages users see for bad input."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from sqsd_callback import DirectionSet, score_samples
from sqsd_callback.bank import DirectionBank
from sqsd_callback.layers import lora_targets
from sqsd_callback.types import Direction
from sqsd_lab.tiny import random_samples, random_set, score_err, tiny_base, tiny_lora


def _shapes(model):
    return {m: t.shape for m, t in lora_targets(model).items()}


def test_peft_adapter_gives_B_at_A_under_base_model_names(tmp_path):
    adapter = tiny_lora("llama", seed=3)
    adapter.save_pretrained(tmp_path / "danger")
    ds = DirectionSet.from_peft_adapter(tmp_path / "danger", kind="danger", name="beaver")
    targets = lora_targets(adapter)
    assert sorted(ds.modules) == sorted(targets) and "model.layers.0.self_attn.q_proj" in ds.modules
    for m, t in targets.items():
        assert torch.allclose(ds.modules[m].materialize(), t.B.detach() @ t.A.detach())
    # the adapter's names match a training model with a different LoRA rank and seed
    other = tiny_lora("llama", r=2, seed=9)
    assert DirectionBank([ds], _shapes(other)).modules == list(targets)


def test_safetensors_dense_and_low_rank_round_trip(tmp_path):
    model = tiny_lora("llama")
    for rank in (None, 2):
        ds = random_set(model, "safety", "pku", rank=rank, seed=1)
        ds.save(tmp_path / f"d{rank}.safetensors")
        back = DirectionSet.from_safetensors(tmp_path / f"d{rank}.safetensors", kind="safety", name="pku")
        for m, d in ds.modules.items():
            assert torch.equal(back.modules[m].materialize(), d.materialize())
            assert (back.modules[m].dense is None) == (rank is not None)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float64])
def test_directions_keep_a_half_precision_file_in_its_dtype(tmp_path, stored):
    """A bf16 or fp16 file (a PEFT adapter or a directions file) loads in its own dtype, half the memory of fp32,
    with the values as stored; fp64 loads as fp32. The bank keeps each set's dtype."""
    model = tiny_lora("llama")
    want = torch.float32 if stored == torch.float64 else stored
    ds = random_set(model, "danger", "d", rank=2, seed=1).to(dtype=stored)
    ds.save(tmp_path / "d.safetensors")
    adapter = tiny_lora("llama", seed=3).to(stored)
    adapter.save_pretrained(tmp_path / "adapter")
    for back in (DirectionSet.from_safetensors(tmp_path / "d.safetensors", kind="danger"),
                 DirectionSet.from_peft_adapter(tmp_path / "adapter", kind="danger")):
        assert back.dtype == want
        assert DirectionBank([back], _shapes(model)).to("cpu").per_module[next(iter(back.modules))][0].B.dtype == want
    back = DirectionSet.from_safetensors(tmp_path / "d.safetensors", kind="danger")
    for m, d in ds.modules.items():
        assert torch.equal(back.modules[m].B, d.B.to(want)) and torch.equal(back.modules[m].A, d.A.to(want))


def test_sets_of_different_dtypes_in_one_bank_warn_and_score_like_the_loop():
    """A bf16 set beside an fp32 one (a half-precision Hub adapter and a weight-difference set) is stacked in fp32:
    a warning says so and how to hold both in bf16; the scores still equal the loop's (1e-5)."""
    model = tiny_lora("llama")
    danger = [random_set(model, "danger", "d1", rank=2, seed=1).to(dtype=torch.bfloat16)]
    safety = [random_set(model, "safety", "s1", rank=2, seed=3)]
    samples = random_samples(4, seed=2)
    with pytest.warns(UserWarning, match=r"different dtypes \(torch.bfloat16, torch.float32\) are stacked"):
        got = score_samples(model, samples, danger, safety, progress=False)
    want = score_samples(model, samples, danger, safety, engine="loop", progress=False)
    assert score_err(got, want, "sqsd") < 1e-5


def test_weight_diff_full_and_truncated_svd():
    base, aligned = tiny_base("llama", seed=0), tiny_base("llama", seed=1)
    full = DirectionSet.from_weight_diff(aligned, base, kind="safety")
    name = "model.layers.0.mlp.down_proj"
    diff = aligned.get_submodule(name).weight - base.get_submodule(name).weight
    assert torch.allclose(full.modules[name].materialize(), diff.detach())
    low = DirectionSet.from_weight_diff(aligned.state_dict(), base.state_dict(), kind="safety", rank=4)
    S = torch.linalg.svdvals(diff.detach().double())
    assert low.energy_kept[name] == pytest.approx(float(S[:4].pow(2).sum() / S.pow(2).sum()), rel=1e-9)
    U, S_, Vh = torch.linalg.svd(diff.detach().double())
    best = (U[:, :4] * S_[:4]) @ Vh[:4]
    assert torch.allclose(low.modules[name].materialize().double(), best, atol=1e-5)


def test_low_rank_norm_never_forms_the_matrix_and_is_exact():
    d = Direction(B=torch.randn(50, 3), A=torch.randn(3, 40))
    assert d.sq_norm() == pytest.approx(float((d.B @ d.A).double().pow(2).sum()), rel=1e-9)


# ------------------------------------------------------------------ bad input
def test_missing_adapter_file_names_the_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        DirectionSet.from_peft_adapter(tmp_path / "a", kind="danger")


def test_dora_adapter_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    save_file({"x.lora_A.weight": torch.ones(2, 3)}, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="DoRA"):
        DirectionSet.from_peft_adapter(tmp_path / "a", kind="danger")


def test_directions_matching_no_module_say_architecture(tmp_path):
    model = tiny_lora("llama")
    ds = DirectionSet({"transformer.h.0.attn.c_attn": Direction(dense=torch.ones(4, 4))}, "danger", "gpt2")
    with pytest.raises(ValueError, match="matches no module.*another architecture"):
        DirectionBank([ds], _shapes(model))


def test_wrong_shape_is_reported_with_both_shapes():
    model = tiny_lora("llama")
    ds = random_set(model, "danger", "d")
    ds.modules["model.layers.0.self_attn.q_proj"] = Direction(dense=torch.ones(16, 32))
    with pytest.raises(ValueError, match=r"1 module\(s\) have the wrong shape.*\(16, 32\) vs model weight \(32, 32\)"):
        DirectionBank([ds], _shapes(model))


@pytest.mark.parametrize("bad,msg", [(math.nan, "NaN/Inf"), (math.inf, "NaN/Inf"), (0.0, "zero direction")])
def test_nan_inf_and_zero_directions(bad, msg):
    model = tiny_lora("llama")
    ds = random_set(model, "safety", "s", rank=None)
    ds.modules["model.layers.1.mlp.down_proj"].dense.fill_(bad)
    with pytest.raises(ValueError, match=msg):
        score_samples(model, [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], [], [ds], progress=False)


def test_partial_coverage_warns_with_counts():
    model = tiny_lora("llama")
    ds = random_set(model, "danger", "d", modules=["q_proj"])
    ds.modules["model.layers.0.mlp.up_proj"] = Direction(dense=torch.ones(48, 32))
    with pytest.warns(UserWarning, match="covers 2 of the model's 6 trained modules \\(1 of its 3"):
        DirectionBank([ds], _shapes(model))


def test_kind_name_and_model_checks():
    with pytest.raises(ValueError, match="kind must be one of"):
        DirectionSet({"a": Direction(dense=torch.ones(2, 2))}, "toxic", "x")
    model = tiny_lora("llama")
    d1, d2 = random_set(model, "danger", "same"), random_set(model, "danger", "same", seed=4)
    with pytest.raises(ValueError, match="repeated: \\['danger/same'\\]"):
        DirectionBank([d1, d2], _shapes(model))
    frozen = tiny_base("llama").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable layer of a kind SQSD scores.*get_peft_model"):
        score_samples(frozen, [{"input_ids": [1, 2], "labels": [1, 2]}], [d1], [], progress=False)


def test_weight_diff_of_gpt2_conv1d_layers_is_oriented_like_lora():
    """GPT-2 stores Conv1D weights in×out (PEFT's fan_in_fan_out). A LoRA adapter merged into a copy of the model
    makes W_aligned − W_base exactly its delta, so each direction must be s·B@A itself (cosine 1), square c_proj
    included, and the engines must score it alike."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from sqsd_lab.tiny import random_samples, score_err

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                           fan_in_fan_out=True))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    deltas = {m: t.scaling * t.B.detach() @ t.A.detach() for m, t in lora_targets(lora).items()}
    aligned = copy.deepcopy(lora).merge_and_unload()
    ds = DirectionSet.from_weight_diff(aligned, base, kind="safety", name="merged")
    assert {m for m in deltas if m.endswith("attn.c_proj")} == {"transformer.h.0.attn.c_proj",
                                                                "transformer.h.1.attn.c_proj"}
    for m, delta in deltas.items():
        V = ds.modules[m].materialize()
        cos = float((V * delta).sum() / (V.norm() * delta.norm()))
        assert cos == pytest.approx(1.0, abs=1e-5), m
    covered = DirectionSet({m: ds.modules[m] for m in deltas}, "safety", "merged")  # the rest did not change
    samples = random_samples(4, seed=2)
    got = score_samples(lora, samples, [], [covered], progress=False)
    want = score_samples(lora, samples, [], [covered], engine="loop", progress=False)
    assert score_err(got, want, "safety") < 1e-5


def test_stacked_factors_are_the_one_copy_the_sets_and_bank_hold():
    """The engine stacks each module kind's low-rank factors for batched products; the sets' own tensors become
    views of that stack (same values), so a run holds the directions once, not twice (the old code kept both:
    +58 MB at 30 layers with 3 rank-16 sets)."""
    from sqsd_callback.engines import make_engine

    model = tiny_lora("llama", targets=["q_proj", "down_proj"])
    targets = lora_targets(model)
    sets = [random_set(model, "danger", "d1", seed=1), random_set(model, "safety", "s1", seed=2)]
    values = [{m: (d.B.clone(), d.A.clone()) for m, d in s.modules.items()} for s in sets]
    bank = DirectionBank(sets, {m: t.shape for m, t in targets.items()}).to("cpu")
    engine = make_engine("hooks", targets, bank)
    for group in engine.groups:
        stack = group.VB.untyped_storage().data_ptr()
        for m in group.names:
            for s, before in zip(sets, values):
                assert s.modules[m].B.untyped_storage().data_ptr() == stack
                assert torch.equal(s.modules[m].B, before[m][0]) and torch.equal(s.modules[m].A, before[m][1])


def _mean_abs_cos_of_A(a: DirectionSet, b: DirectionSet) -> float:
    """Mean over shared modules of |cosine| between two low-rank sets' A factors (flattened)."""
    cos = [abs(torch.nn.functional.cosine_similarity(a.modules[m].A.reshape(-1).double(),
                                                     b.modules[m].A.reshape(-1).double(), dim=0).item())
           for m in a.modules]
    return sum(cos) / len(cos)


@pytest.mark.slow
def test_direction_adapters_start_from_their_own_random_A(tmp_path, tiny_model, gguf_tokenizer):
    """`sqsd directions` initialises the danger and safety adapters each from its own random A, and neither from
    the training seed a fine-tune runs with (train_lora's default, 0). Before, all started from seed 0: on the
    demo the danger, safety and fine-tuned adapters' A factors had mean |cosine| 0.97, and the fine-tune's drift was
    +0.044 after one step. Rank-2 A factors of 32 or 64 inputs drawn independently give |cosine| ≈ 0.1; a shared
    start (trained one epoch) gives ≈ 1, so 0.35 separates them."""
    from sqsd_lab.adapters import build_directions, direction_sets, refusal_records
    from sqsd_lab.data import tokenize_chats
    from sqsd_lab.finetune import lora_config, train_lora

    harmful = [f"Explain forbidden thing {i}." for i in range(8)]
    build_directions(tiny_model, gguf_tokenizer, tmp_path / "dirs",
                     danger=[{"prompt": p, "response": "Sure, here is how to do it."} for p in harmful],
                     safety=refusal_records(harmful), rank=2, max_length=64, num_train_epochs=1)
    danger, safety = direction_sets(tmp_path / "dirs")
    pool = [{"prompt": f"What is {a} + 1?", "response": f"{a} + 1 = {a + 1}."} for a in range(8)]
    train_lora(tiny_model, gguf_tokenizer, tokenize_chats(gguf_tokenizer, pool, 64), tmp_path / "ft",
               lora=lora_config(2), num_train_epochs=1)
    tuned = DirectionSet.from_peft_adapter(tmp_path / "ft", kind="danger")
    assert len(danger.modules) == len(tuned.modules) == 14
    for a, b in ((danger, safety), (danger, tuned), (safety, tuned)):
        assert _mean_abs_cos_of_A(a, b) < 0.35, (a.name, b.name)
    summary = json.loads((tmp_path / "dirs" / "directions.json").read_text())
    assert len({s["init_seed"] for s in summary["adapters"].values()}) == 2
