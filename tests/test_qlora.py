"""QLoRA: PEFT's LoRA layers over bitsandbytes 4-bit (NF4) and 8-bit (LLM.int8) base weights are scored, drift is
measured, drops are exact and the anchor applies, each checked at every step against the batch-size-1 loop on the
same quantized model (bitsandbytes' CPU backend). Tolerances as for plain LoRA."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sqsd_callback import SQSDCallback, score_samples
from sqsd_callback.layers import lora_targets
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.tiny import random_samples, random_set, score_err, three_sets, tiny_base, tiny_qlora

from helpers import (
    SCORE_KEYS,
    ThetaEachStep,
    assert_every_step_matches_loop,
    assert_steps_equal_kept_only,
    at,
    dense_asft,
    trainer,
)

pytest.importorskip("bitsandbytes")
STEPS = 3


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_lora_layers_are_targets(tmp_path, bits):
    model = tiny_qlora(tmp_path, bits)
    targets = lora_targets(model)
    assert len(targets) == 6 and {type(model.get_submodule(f"base_model.model.{m}")).__name__
                                   for m in targets} == {"Linear4bit" if bits == 4 else "Linear8bitLt"}
    danger, safety = three_sets(model)
    samples = random_samples(8, seed=3)
    got = score_samples(model, samples, danger, safety, progress=False)
    want = score_samples(model, samples, danger, safety, engine="loop", progress=False)
    for k in SCORE_KEYS:
        assert score_err(got, want, k) < 1e-5, k


@pytest.fixture
def int8_training_kernel(monkeypatch):
    """bitsandbytes' CPU backend runs an LLM.int8 layer through a dequantized fp matmul in training mode and through
    int8-quantized inputs in eval mode (logits differ by ~0.5%); the loop engine scores in eval mode (no dropout).
    So that the batch-size-1 reference runs the kernel the training step ran, 8-bit layers keep the training path."""
    import bitsandbytes as bnb
    forward = bnb.nn.Linear8bitLt.forward

    def training_path(self, x):
        mode, self.training = self.training, True
        try:
            return forward(self, x)
        finally:
            self.training = mode
    monkeypatch.setattr(bnb.nn.Linear8bitLt, "forward", training_path)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_every_step_with_drops_and_anchor(tmp_path, bits, int8_training_kernel):
    """Default optimizer, accumulation 2, checkpointing, the riskier half of each micro-batch dropped and the AsFT
    anchor on: every step's rows equal the loop at that step's θ, θ after every step equals the hand-written
    loop on the kept examples plus the anchor's gradient, and each logged anchor penalty is the dense AsFT value
    at its step's θ."""
    model, reference = tiny_qlora(tmp_path, bits), tiny_qlora(tmp_path, bits)
    danger, safety = three_sets(model)
    anchor = random_set(model, "safety", "aligned", rank=2, seed=9)
    samples = random_samples(12, seed=5)
    start = copy.deepcopy(model)
    thetas = ThetaEachStep()
    kw = dict(accum=2, steps=STEPS, adam_epsilon=1e-6, max_grad_norm=0.05)
    cb = SQSDCallback(danger, safety, drop_top_fraction=0.5, anchor=anchor, anchor_lambda=0.5)
    run = trainer(model, samples, tmp_path / "run", [cb, thetas], gradient_checkpointing=True, **kw)
    run.train()
    rows = read_jsonl(tmp_path / "run" / "sqsd" / "scores.jsonl")
    assert all(sum(r["dropped"] for r in rows if r["step"] == s) == 2 for s in range(STEPS))
    assert_every_step_matches_loop(start, samples, tmp_path / "run", thetas, danger, safety, steps=STEPS)

    logged = [h["sqsd/anchor_penalty"] for h in run.state.log_history if "loss" in h]
    dirs = {m: d.materialize() for m, d in anchor.modules.items()}
    with torch.no_grad():
        want = [float(dense_asft(at(start, thetas.theta[s]), dirs, 0.5)) for s in range(STEPS)]
    assert logged == pytest.approx(want, rel=1e-5)
    assert_steps_equal_kept_only(reference, samples, rows, tmp_path / "ref", thetas,
                                 penalty=lambda m: dense_asft(m, dirs, 0.5), **kw)


def test_vmap_refuses_quantized_layers_by_name(tmp_path):
    model = tiny_qlora(tmp_path, 4)
    danger, safety = three_sets(model)
    with pytest.raises(ValueError, match=r"engine='vmap' cannot run a model with bitsandbytes layers \(Linear4bit"):
        score_samples(model, random_samples(2), danger, safety, engine="vmap", progress=False)


def test_unknown_lora_layer_kind_is_refused_by_name():
    model = get_peft_model(tiny_base("llama"), LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(ValueError, match=r"embed_tokens is a LoRA layer of type peft\.tuners\.lora\.layer\.Embedding"
                                         r".*Leave this module out"):
        lora_targets(model)


def test_scoring_keeps_4bit_layers_off_the_avx512_bf16_repack_and_a_repacked_layer_is_refused(tmp_path, monkeypatch):
    """On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight in place at its first eval-mode forward
    on an input without gradient, after which no gradient flows through it. Offline scoring (and the oracle engines'
    passes) run in eval mode: with the flag on, as bitsandbytes sets it on such a CPU, no layer may be repacked (the
    repack is recorded instead of run, so this runs on any CPU); a layer already repacked is refused by name, where
    the old code scored it silently without the gradient through its base weight."""
    import bitsandbytes.nn.modules as bnb_modules

    model = tiny_qlora(tmp_path / "base", bits=4)
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers
    for m in layers:
        m.support_avx512bf16_for_cpu = True
    repacked = []
    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu",
                        lambda w, state: repacked.append(state) or (w, state))
    danger, safety = three_sets(model)
    score_samples(model, random_samples(4, seed=2), danger, safety, engine="hooks")
    score_samples(model, random_samples(4, seed=2), danger, safety, engine="loop")
    assert repacked == [] and all(m.support_avx512bf16_for_cpu for m in layers)  # restored for the user
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "base_layer"))
    layer.get_base_layer().weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match=r"q_proj: bitsandbytes repacked this 4-bit layer.*Reload the model"):
        score_samples(model, random_samples(4, seed=2), danger, safety)
