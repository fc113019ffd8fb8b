"""Packed (padding-free) batches: each example of a packed row gets the score it has on its own."""

import pytest
import torch

from sqsd_callback import SQSDCallback, score_samples
from sqsd_callback.engines.base import Segments
from sqsd_callback.sinks import read_jsonl
from sqsd_callback.testing import pack_collator, random_samples, rel_err, three_sets, tiny_base, tiny_lora

from helpers import SCORE_KEYS, trainer


def test_segments_split_rows_at_position_resets():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])  # the second row's last slot is padding
    seg = Segments.from_position_ids(pos, mask)
    x = torch.arange(12.0).reshape(2, 6, 1)
    assert seg.split(x)[..., 0].tolist() == [[0, 1, 2, 0], [3, 4, 0, 0], [5, 0, 0, 0], [6, 7, 8, 9], [10, 0, 0, 0]]
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
        assert rel_err([r[k] for r in rows], [expected[r["index"]][k] for r in rows]) < 1e-5, k

