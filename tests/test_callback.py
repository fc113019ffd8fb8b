"""SQSDCallback inside real Trainer / SFTTrainer runs, checked against score_samples and dense drift math."""

import copy

import pytest
import torch
from datasets import Dataset

from sqsd_callback import DirectionSet, SQSDCallback, score_samples
from sqsd_callback.directions import Direction
from sqsd_callback.layers import lora_targets
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.tiny import (
    VOCAB,
    pad_collator,
    random_samples,
    random_set,
    rel_err,
    score_err,
    three_sets,
    tiny_base,
    tiny_lora,
    word_tokenizer,
)

from helpers import SCORE_KEYS, trainable, trained_weights, trainer, unchanged


def _train(model, samples, cb, tmp_path, side="right", steps=2, **kw):
    run = trainer(model, samples, tmp_path, [cb], accum=2, steps=steps, lr=1e-2, collator=pad_collator(side),
                  **{"lr_scheduler_type": "constant", "seed": 3, "max_grad_norm": 1.0, **kw})
    run.train()
    return run


@pytest.mark.parametrize("arch,side,metric,engine", [
    ("llama", "left", "cosine", "hooks"), ("qwen2", "right", "projection", "hooks"),
    ("llama", "right", "global_cosine", "hooks"), ("llama", "right", "cosine", "vmap")])
def test_first_step_scores_equal_score_samples(tmp_path, arch, side, metric, engine):
    """Grad accumulation 2, gradient checkpointing, padding: the step's own backward (hooks), or an oracle pass at
    the step's parameters (vmap, under the input-grad hooks PEFT + checkpointing add), gives the batch-size-1
    scores (max deviation ≤ 1e-5 × each key's scale, testing.score_scale)."""
    model = tiny_lora(arch)
    danger, safety = three_sets(model)
    samples = random_samples(8, seed=11)
    expected = score_samples(model, samples, danger, safety, metric=metric, progress=False)
    _train(model, samples, SQSDCallback(danger, safety, metric=metric, engine=engine), tmp_path, side=side,
           gradient_checkpointing=True)
    rows = read_jsonl(tmp_path / "sqsd" / "scores.jsonl")
    assert [r["step"] for r in rows] == [0] * 4 + [1] * 4
    assert sorted(r["index"] for r in rows) == list(range(8))  # shuffled, but every position recovered
    first = [r for r in rows if r["step"] == 0]
    for k in SCORE_KEYS:
        assert score_err(first, [expected[r["index"]] for r in first], k) < 1e-5, k
    later = [r for r in rows if r["step"] == 1]  # scored at θ_1, not θ_0
    assert rel_err([r["sqsd"] for r in later], [expected[r["index"]]["sqsd"] for r in later]) > 1e-3


@pytest.mark.parametrize("zero_start", [False, True])
def test_drift_and_logged_scalars_match_dense_math(tmp_path, zero_start):
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    targets = lora_targets(model)
    if zero_start:  # PEFT's B = 0 start (kept as no snapshot): every layer-0 module, and q_proj in every layer
        with torch.no_grad():
            for m, t in targets.items():
                if "layers.0." in m or "q_proj" in m:
                    t.B.zero_()
    start = trained_weights(model)
    trainer = _train(model, random_samples(8, seed=2), SQSDCallback(danger, safety), tmp_path, steps=3)
    drift = read_jsonl(tmp_path / "sqsd" / "drift.jsonl")
    assert [d["step"] for d in drift] == [1, 2, 3]
    deltas = {m: w - start[m] for m, w in trained_weights(model).items()}
    cos = {}
    for s in danger + safety:
        num = sum(float((deltas[m] * d.materialize()).sum()) for m, d in s.modules.items())
        wn = sum(float(deltas[m].pow(2).sum()) for m in s.modules) ** 0.5
        vn = sum(float(d.materialize().pow(2).sum()) for d in s.modules.values()) ** 0.5
        cos[s.name] = num / (wn * vn)
        assert drift[-1][f"cosine/{s.kind}/{s.name}"] == pytest.approx(cos[s.name], rel=1e-5, abs=1e-7)
    expect = (cos["d1"] + cos["d2"]) / 2 - cos["s1"]
    assert drift[-1]["drift"] == pytest.approx(expect, rel=1e-5)
    for m, layer in drift[-1]["layers"].items():  # every module and set: layers are measured a group at a time
        for k, s in enumerate(danger + safety):
            d = s.modules[m].materialize()
            cos_m = float((deltas[m] * d).sum() / (deltas[m].norm() * d.norm()))
            assert layer["cosine"][k] == pytest.approx(cos_m, rel=1e-5, abs=1e-7), (m, s.name)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["sqsd/drift"] for h in logged] == pytest.approx([d["drift"] for d in drift])
    rows = read_jsonl(tmp_path / "sqsd" / "scores.jsonl")
    last = [r["sqsd"] for r in rows if r["step"] == 2]
    assert logged[-1]["sqsd/batch_sqsd_max"] == pytest.approx(max(last))
    assert logged[-1]["sqsd/batch_sqsd_mean"] == pytest.approx(sum(last) / len(last))


def test_dataset_own_index_column_is_used_and_kept_from_the_model(tmp_path):
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    samples = [dict(s, index=100 + 7 * i) for i, s in enumerate(random_samples(8, seed=2))]
    _train(model, samples, SQSDCallback(danger, safety), tmp_path, remove_unused_columns=False)
    rows = read_jsonl(tmp_path / "sqsd" / "scores.jsonl")
    assert sorted(r["index"] for r in rows) == [100 + 7 * i for i in range(8)]


def test_duplicate_examples_resolve_to_first_position_and_are_counted(tmp_path):
    import json
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    samples = random_samples(6, seed=2)
    samples += [samples[1], samples[3]]
    _train(model, samples, SQSDCallback(danger, safety), tmp_path)
    rows = read_jsonl(tmp_path / "sqsd" / "scores.jsonl")
    assert sorted(r["index"] for r in rows) == [0, 1, 1, 2, 3, 3, 4, 5]
    assert json.loads((tmp_path / "sqsd" / "run.json").read_text())["duplicate_examples"] == 2


def test_unscored_example_is_null_and_training_goes_on(tmp_path):
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    samples = random_samples(8, seed=5)
    samples[4]["labels"] = [-100] * len(samples[4]["labels"])
    _train(model, samples, SQSDCallback(danger, safety), tmp_path)
    rows = {r["index"]: r for r in read_jsonl(tmp_path / "sqsd" / "scores.jsonl")}
    assert rows[4]["sqsd"] is None and rows[4]["danger"] is None
    assert all(r["sqsd"] is not None for i, r in rows.items() if i != 4)


def test_hooks_score_what_training_used_with_lora_dropout(tmp_path):
    """With lora_dropout the step's own scores differ from the dropout-free oracle (they use the masks)."""
    model = tiny_lora("llama", dropout=0.5)
    danger, safety = three_sets(model)
    samples = random_samples(8, seed=11)
    expected = score_samples(model, samples, danger, safety, progress=False)
    _train(model, samples, SQSDCallback(danger, safety), tmp_path)
    first = [r for r in read_jsonl(tmp_path / "sqsd" / "scores.jsonl") if r["step"] == 0]
    assert rel_err([r["sqsd"] for r in first], [expected[r["index"]]["sqsd"] for r in first]) > 1e-2


def test_bf16_autocast_scores_track_fp32(tmp_path):
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    samples = random_samples(8, seed=11)
    expected = score_samples(model, samples, danger, safety, progress=False)
    _train(model, samples, SQSDCallback(danger, safety), tmp_path, bf16=True)
    first = [r for r in read_jsonl(tmp_path / "sqsd" / "scores.jsonl") if r["step"] == 0]
    assert score_err(first, [expected[r["index"]] for r in first], "sqsd") < 5e-2


def test_wrong_kind_and_empty_callback_are_refused():
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    with pytest.raises(ValueError, match="is a safety set but was passed as danger"):
        SQSDCallback(danger=safety)
    with pytest.raises(ValueError, match="at least one direction set"):
        SQSDCallback()
    with pytest.raises(TypeError, match="must be DirectionSet objects"):
        SQSDCallback(danger=["dirs/danger"])


# ---------------------------------------------------------------- TRL SFTTrainer
def _prompt_completion(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = lambda k: " ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (k,), generator=g))  # noqa: E731
    return Dataset.from_list([{"prompt": words(int(torch.randint(2, 6, (1,), generator=g))),
                               "completion": " " + words(int(torch.randint(2, 6, (1,), generator=g)))}
                              for _ in range(n)])


def _sft(tmp_path, cb, model, peft_config=None, **kw):
    from trl import SFTConfig, SFTTrainer
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                     report_to=[], save_strategy="no", use_cpu=True, **kw)
    trainer = SFTTrainer(model=model, args=args, train_dataset=_prompt_completion(8), peft_config=peft_config,
                         processing_class=word_tokenizer(), callbacks=[cb])
    trainer.train()
    return trainer


def test_sft_trainer_defaults_complete_and_log_drift(tmp_path):
    """SFTTrainer defaults: gradient checkpointing on, bf16, completion-only loss, its fused log-prob loss."""
    from peft import LoraConfig
    ref = tiny_lora("llama")
    danger, safety = three_sets(ref)
    trainer = _sft(tmp_path, SQSDCallback(danger, safety), tiny_base("llama"),
                   peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert trainer.args.gradient_checkpointing and trainer.args.bf16
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("sqsd/drift" in h for h in logged)
    rows = read_jsonl(tmp_path / "sqsd" / "scores.jsonl")
    assert len(rows) == 4 and all(r["sqsd"] is not None for r in rows)
    assert sorted(r["index"] for r in rows) == sorted(set(r["index"] for r in rows))


def test_trl_dft_loss_is_refused_before_the_first_step(tmp_path):
    """DFT weights each token by its probability: the old code scored it as the mean loss, up to 0.89 off."""
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    start = trainable(model)
    with pytest.raises(ValueError, match="loss_type='dft'"):
        _sft(tmp_path, SQSDCallback(danger, safety), model, bf16=False, loss_type="dft")
    assert unchanged(model, start)


def test_sft_trainer_projection_scores_equal_score_samples(tmp_path):
    """fp32 SFTTrainer: the per-example scale read off TRL's per-token log-prob loss gives batch-size-1
    projections (the scale-sensitive metric)."""
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    before = copy.deepcopy(model)
    trainer = _sft(tmp_path, SQSDCallback(danger, safety, metric="projection"), model, bf16=False)
    data = trainer.train_dataset
    samples = [{"input_ids": ex["input_ids"], "labels": ex["labels"] if "labels" in ex else  # TRL < 1: a mask
                [t if m else -100 for t, m in zip(ex["input_ids"], ex["completion_mask"])]} for ex in data]
    assert all(-100 in s["labels"] for s in samples)  # completion-only loss
    expected = score_samples(before, samples, danger, safety, metric="projection", progress=False)
    first = [r for r in read_jsonl(tmp_path / "sqsd" / "scores.jsonl") if r["step"] == 0]
    for k in SCORE_KEYS:
        assert score_err(first, [expected[r["index"]] for r in first], k) < 1e-5, k


def test_report_from_a_run(tmp_path):
    from sqsd_lab.report import write_report
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    run = _sft(tmp_path, SQSDCallback(danger, safety), model, bf16=False)
    examples = {r["index"]: r for r in read_jsonl(tmp_path / "sqsd" / "examples.jsonl")}
    texts = {i: r["text"] for i, r in examples.items()}
    assert len(texts) == 4 and all(t.startswith("w") for t in texts.values())
    for i, r in examples.items():  # split at the first scored token: the dataset's own prompt and completion
        row = run.train_dataset[i]
        assert r["prompt"].strip() == row["prompt"]
        assert r["response"].strip() == row["completion"].replace("<eos>", "").strip()
    md = write_report(tmp_path).read_text()
    for png in ("drift.png", "layers.png", "scores.png"):
        assert (tmp_path / "sqsd" / "report" / png).stat().st_size > 5000
    top = max((r for r in read_jsonl(tmp_path / "sqsd" / "scores.jsonl")), key=lambda r: r["sqsd"])
    first_row = md.split("| rank |")[1].splitlines()[2]
    shown = f"{examples[top['index']]['prompt'].strip()[-70:]} → {examples[top['index']]['response'][:80].strip()}"
    assert first_row.startswith(f"| 1 | {top['index']} | {top['sqsd']:+.4f}") and shown in first_row


def test_sft_packing_index_names_an_example_of_dataset_examples(tmp_path, caplog):
    """Under packing=True the index is a position in dataset_examples(trainer.train_dataset) (packed order), said
    once at train start: each row's example decodes to the text examples.jsonl holds for that index."""
    from sqsd_callback import dataset_examples
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    with caplog.at_level("WARNING"):
        trainer = _sft(tmp_path, SQSDCallback(danger, safety), model, bf16=False, packing=True, max_length=24,
                       padding_free=True)
    assert any("packed order" in r.getMessage() for r in caplog.records)
    examples = dataset_examples(trainer.train_dataset)
    assert len(examples) == 8 and len(trainer.train_dataset) < 8  # eight examples in fewer packed rows
    texts = {r["index"]: r["text"] for r in read_jsonl(tmp_path / "sqsd" / "examples.jsonl")}
    rows = read_jsonl(tmp_path / "sqsd" / "scores.jsonl")
    assert rows and all(r["index"] is not None for r in rows)
    tok = word_tokenizer()
    for r in rows:
        assert tok.decode(examples[r["index"]], skip_special_tokens=True)[:600] == texts[r["index"]]


def test_warns_when_the_adapter_starts_from_a_sets_own_random_A(tmp_path, caplog):
    """An adapter initialised like a direction set's (same seed, rank, modules) shares its random A: every update
    lies in the set's row space and the first steps' cosines measure that. Said once at train start, naming the
    set and the mean |cosine| of the A factors (hand-computed here); an independent set is not named."""
    model = tiny_lora("llama")
    g = torch.Generator().manual_seed(11)
    shared = {m: Direction(B=torch.randn(t.shape[0], t.rank, generator=g),
                           A=t.A.detach() + 0.3 * t.A.detach().std() * torch.randn(t.A.shape, generator=g))
              for m, t in lora_targets(model).items()}
    expected = sum(abs(torch.nn.functional.cosine_similarity(d.A.reshape(-1).double(),
                                                             lora_targets(model)[m].A.detach().reshape(-1).double(),
                                                             dim=0).item()) for m, d in shared.items()) / len(shared)
    assert 0.9 < expected < 0.99
    danger = DirectionSet(shared, "danger", "same_seed")
    other = random_set(model, "safety", "independent", seed=3)
    with caplog.at_level("WARNING"):
        trainer(model, random_samples(4), tmp_path, [SQSDCallback([danger], [other])], steps=1).train()
    said = [r.getMessage() for r in caplog.records if "start where direction set" in r.getMessage()]
    assert len(said) == 1 and "'same_seed'" in said[0] and f"{expected:.2f} over {len(shared)} modules" in said[0]
