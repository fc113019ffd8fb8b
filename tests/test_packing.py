"""Packed (padding-free) batches: each example of a packed row gets the score it has on its own."""

import pytest
import torch

from sqsd_callback import SQSDCallback, score_samples
from sqsd_callback.sinks import read_jsonl
from sqsd_callback.types import Segments
from sqsd_lab.tiny import pack_collator, random_samples, score_err, three_sets, tiny_base, tiny_lora

from helpers import SCORE_KEYS, trainer


def test_segments_split_rows_at_position_resets():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])  # the second row's last slot is padding
    seg = Segments.from_position_ids(pos, mask)
    x = torch.arange(12.0).reshape(2, 6, 1)
    assert seg.by_example(x)[..., 0].tolist() == [[0, 1, 2, 0], [3, 4, 0, 0], [5, 0, 0, 0], [6, 7, 8, 9], [10, 0, 0, 0]]
    assert Segments.from_position_ids(torch.arange(4).expand(2, 4), torch.ones(2, 4)) is None  # nothing packed


@pytest.mark.parametrize("metric, kind, engine", [
    ("cosine", "lora", "hooks"), ("projection", "lora", "hooks"), ("cosine", "full", "hooks"),
    ("projection", "full", "hooks"), ("cosine", "lora", "vmap"), ("cosine", "lora", "loop")])
def test_packed_rows_score_like_the_unpacked_examples(tmp_path, metric, kind, engine):
    """The oracles too: they take each example of a packed row on its own row (not the row as one example)."""
    if kind == "lora":
        model = tiny_lora("llama")
    else:
        model = tiny_base("llama")
        for name, p in model.named_parameters():
            p.requires_grad_("proj" in name)
    danger, safety = three_sets(model)
    samples = random_samples(8, seed=13)
    for s in samples:  # the packed collator does not score an example's first token: nor does its reference
        s["labels"][0] = -100
    expected = score_samples(model, samples, danger, safety, metric=metric, progress=False)
    trainer(model, samples, tmp_path, [SQSDCallback(danger, safety, metric=metric, engine=engine)], batch=4, accum=2,
            steps=1, lr=1e-3, collator=pack_collator(), gradient_checkpointing=True, max_grad_norm=1.0, seed=42).train()
    rows = read_jsonl(tmp_path / "sqsd" / "scores.jsonl")
    assert sorted(r["index"] for r in rows) == list(range(8))
    for k in SCORE_KEYS:
        assert score_err(rows, [expected[r["index"]] for r in rows], k) < 1e-5, k



def _masked(collate, four_d: bool):
    """LLaMA-Factory's packing: position_ids restart per example but an attention_mask of ones comes too (its
    `packing`), or a 4-D block mask (its `neat_packing`)."""
    def with_mask(features):
        batch = collate(features)
        ones = torch.ones_like(batch["input_ids"])
        T = ones.shape[1]
        batch["attention_mask"] = torch.zeros(1, 1, T, T).masked_fill(~torch.ones(T, T).tril().bool(),
                                                                       float("-inf")) if four_d else ones
        return batch
    return with_mask


@pytest.mark.parametrize("four_d, match", [(False, "attend to one another"), (True, "4-D attention mask")])
def test_packed_rows_whose_examples_see_each_other_are_refused(tmp_path, four_d, match):
    """transformers keeps packed examples apart only without an attention_mask: with one of ones each example's
    gradient depends on its neighbours (no score is its own), and a 4-D mask says nothing SQSD reads. Both are
    refused at the first forward, before any optimizer step (the old code scored the mask of ones silently and
    crashed on the 4-D mask with a shape error)."""
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = trainer(model, random_samples(4, seed=13), tmp_path, [SQSDCallback(danger, safety)], batch=4, steps=1,
                  collator=_masked(pack_collator(), four_d))
    with pytest.raises(ValueError, match=match):
        run.train()
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
