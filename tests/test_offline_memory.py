"""Offline scoring with decoder layers checkpointed: the same scores as the batch-size-1 loop (every architecture and
training kind the engines cover), a fraction of the activation memory, and the model put back as it was."""

from __future__ import annotations

import pytest
import torch

from sqsd_callback import score_samples
from sqsd_callback.offline import decoder_layers, layers_checkpointed
from sqsd_lab.tiny import random_samples, score_err, three_sets, tiny_base, tiny_full_ft, tiny_lora

KEYS = ("danger", "safety", "sqsd", "danger/d1", "danger/d2", "safety/s1")


def gpt2_full_ft():
    """GPT-2 trained in full on its Conv1D layers (stored in×out)."""
    model = tiny_base("gpt2")
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".weight") and any(m in name for m in ("c_attn", "c_fc", "attn.c_proj")))
    return model


@pytest.mark.parametrize("build", [lambda: tiny_lora("llama"), lambda: tiny_lora("qwen2"),
                                   lambda: tiny_full_ft("llama"), gpt2_full_ft],
                         ids=["lora-llama", "lora-qwen2", "full_ft-llama", "full_ft-gpt2"])
def test_checkpointed_scores_equal_the_loop(build):
    """Recomputation in eval mode is the same arithmetic: every key within 1e-5 of its scale (score_err)."""
    model = build()
    if any("lora_B" in n for n, _ in model.named_parameters()):  # B ≠ 0, so both factors' gradients count
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    danger, safety = three_sets(model)
    samples = random_samples(6, seed=2, max_len=20)
    want = score_samples(model, samples, danger, safety, engine="loop", progress=False)
    got = score_samples(model, samples, danger, safety, batch_size=3, gradient_checkpointing=True, progress=False)
    assert max(score_err(got, want, k) for k in KEYS) < 1e-5


def _allocation_peak(run) -> int:
    """Peak bytes of PyTorch's CPU allocations while ``run()`` runs (the profiler's memory events, in time order)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    changes = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                     for e in prof.events())
    total = peak = 0
    for _, change in changes:
        total += change
        peak = max(peak, total)
    return peak


def test_checkpointing_keeps_one_layers_activations_not_every_layers():
    """8 layers, 2 examples of 400 tokens: checkpointed, the pass holds each layer's input and one layer's
    activations at a time; the peak of PyTorch's allocations falls below a third (kernels' own scratch differs
    between CPUs, the layer count's share does not)."""
    model = tiny_lora("llama", layers=8)
    danger, safety = three_sets(model)
    samples = random_samples(2, seed=1, min_len=400, max_len=400)
    plain = _allocation_peak(lambda: score_samples(model, samples, danger, safety, progress=False))
    checkpointed = _allocation_peak(lambda: score_samples(model, samples, danger, safety, gradient_checkpointing=True,
                                                          progress=False))
    assert checkpointed < plain / 3, (checkpointed, plain)


def test_layers_checkpointed_puts_each_forward_back():
    model = tiny_lora("llama")
    layers = decoder_layers(model)
    assert len(layers) == 2 and all(type(m).__name__ == "LlamaDecoderLayer" for m in layers)
    own = layers[0].forward  # an instance attribute of its own (as accelerate's hooks set), kept through
    layers[0].forward = own
    with layers_checkpointed(model):
        assert all("forward" in m.__dict__ for m in layers)
    assert layers[0].__dict__["forward"] is own and "forward" not in layers[1].__dict__


def test_checkpoint_without_decoder_layers_is_refused(monkeypatch):
    """A model with no layer transformers marks (none found) is refused before any pass, not run unchecked."""
    from sqsd_callback import offline
    model = tiny_lora("llama")
    monkeypatch.setattr(offline, "decoder_layers", lambda model: [])
    with pytest.raises(ValueError, match="no layer transformers marks as one"):
        score_samples(model, random_samples(2), *three_sets(model), gradient_checkpointing=True, progress=False)
