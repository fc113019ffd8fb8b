"""A new user's bad inputs, each named with its fix before or at the first step: labels all -100, an adapter or
direction set made for another model size, an empty training set, bitsandbytes' kernel notice on the sqsd
commands' stderr, and the GGUF loader a script needs to train the embedded model."""

import json
import subprocess
import sys
import warnings

import pytest
import transformers
from datasets import Dataset
from packaging.version import Version
from peft import LoraConfig, get_peft_model

from sqsd_callback import DirectionSet, SQSDCallback, score_samples
from sqsd_callback.offline import load_adapter
from sqsd_lab.tiny import random_samples, three_sets, tiny_base, tiny_lora

from helpers import trainer

FIX = ("collator", "completion-only masking", "dataset's `labels` column")


def _masked(samples):
    return [dict(s, labels=[-100] * len(s["labels"])) for s in samples]


def _run(samples, tmp_path, **kw):
    """A tiny LoRA run with three direction sets; returns (the Trainer, every warning's text)."""
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    run = trainer(model, samples, tmp_path, [SQSDCallback(danger, safety)], **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.train()
    return run, [str(w.message) for w in caught]


# ------------------------------------------------------------------ 1. labels all -100


def test_step_whose_labels_are_all_masked_names_the_mask_and_its_fix(tmp_path):
    """Every label -100: one warning naming the problem and the three places to look, and the Trainer's logs count
    the examples without a scored token (2 per step: batch 2, no accumulation)."""
    run, said = _run(_masked(random_samples(4, seed=1)), tmp_path, steps=2)
    found = [m for m in said if "labels are all -100" in m]
    assert len(found) == 1, said  # once, not at every step
    assert found[0].startswith("No example of optimizer step 0 has a scored token")
    assert all(f in found[0] for f in FIX), found[0]
    assert [h["sqsd/unscored_examples"] for h in run.state.log_history if "loss" in h] == [2, 2]


def test_micro_batch_without_a_scored_token_warns_once(tmp_path):
    """Batch 1, accumulation 2: the one masked example's micro-batch shares its step with a scored one, so the
    micro-batch warning is given, not the whole-step one."""
    samples = random_samples(4, seed=1)
    samples[2] = _masked([samples[2]])[0]
    run, said = _run(samples, tmp_path, batch=1, accum=2, steps=2)
    found = [m for m in said if "has no scored token" in m]
    assert len(found) == 1 and found[0].startswith("Micro-batch "), said
    assert "of 2 in optimizer step" in found[0] and all(f in found[0] for f in FIX)
    assert not any(m.startswith("No example of optimizer step") for m in said)
    assert sum(h.get("sqsd/unscored_examples", 0) for h in run.state.log_history) == 1


def test_normal_run_gives_no_unscored_warning_or_scalar(tmp_path):
    run, said = _run(random_samples(4, seed=1), tmp_path, steps=2)
    assert not [m for m in said if "-100" in m or "scored token" in m], said
    assert not any("sqsd/unscored_examples" in h for h in run.state.log_history)


def test_unscored_count_rides_in_the_checkpoint_and_older_checkpoints_still_load():
    from sqsd_callback.runtime.summary import RunSummary
    summary = RunSummary(top_k=2)
    summary.observe([{"index": 0, "sqsd": None, "dropped": False}, {"index": 1, "sqsd": 0.5, "dropped": False}],
                    None)
    resumed = RunSummary(top_k=2)
    resumed.load_state_dict(json.loads(json.dumps(summary.state_dict())))
    assert resumed.pop()[0]["sqsd/unscored_examples"] == 1
    resumed.load_state_dict({"window": [[0.5], 0], "last_drift": {}, "top": []})  # saved before the count existed
    assert "sqsd/unscored_examples" not in resumed.pop()[0]


def test_train_lora_refuses_masked_or_empty_samples_before_training(tmp_path):
    from sqsd_lab.finetune import train_lora
    with pytest.raises(ValueError, match=r"labels of all 2 training examples are all -100.*collator"):
        train_lora(tiny_lora("llama"), None, _masked(random_samples(2, seed=1)), tmp_path)
    with pytest.raises(ValueError, match=r"empty training set \(0 examples\).*num_samples should be a positive"):
        train_lora(tiny_lora("llama"), None, [], tmp_path)


# ------------------------------------------------------------------ 2. made for another model size


def _adapter_for_hidden_32(folder):
    """A q_proj LoRA adapter of the hidden-32 tiny Llama, saved as PEFT does (q_proj is 32×32 there)."""
    tiny_lora("llama", targets=("q_proj",)).save_pretrained(folder)
    return folder


def _lora_on_hidden_48():
    return get_peft_model(tiny_base("llama", hidden=48), LoraConfig(r=4, target_modules=["q_proj"]))


def test_adapter_for_another_size_is_refused_naming_a_module_both_shapes_and_the_fix(tmp_path):
    """The old code let PEFT try and passed on its raw "size mismatch for base_model.model..." lines."""
    path = _adapter_for_hidden_32(tmp_path / "adapter")
    with pytest.raises(ValueError) as err:
        load_adapter(tiny_base("llama", hidden=48), path)
    message = str(err.value)
    assert message.startswith(f"adapter {path} does not fit the model LlamaForCausalLM")
    assert "2 of its 2 LoRA modules have another shape, e.g. model.layers.0.self_attn.q_proj: 32×32 (out×in) " \
           "in the adapter, 48×48 in the model" in message
    assert "build directions for this model with `sqsd directions --model ...` or pass the model the adapter " \
           "was trained on" in message
    assert "size mismatch" not in message


def test_adapter_of_the_right_size_still_loads(tmp_path):
    path = _adapter_for_hidden_32(tmp_path / "adapter")
    assert type(load_adapter(tiny_base("llama"), path)).__name__ == "PeftModel"


def test_direction_set_for_another_size_names_its_source_and_the_fix(tmp_path):
    """At train begin (before step 1) and in score_samples; the old message named no source and no fix."""
    path = _adapter_for_hidden_32(tmp_path / "adapter")
    danger = DirectionSet.from_peft_adapter(path, kind="danger", name="small")
    want = (rf"Direction set 'small' \({path}\): 2 module\(s\) have the wrong shape, e.g. "
            rf"model.layers.0.self_attn.q_proj: direction \(32, 32\) vs model weight \(48, 48\) \(out×in\).*"
            rf"build directions for this model \(`sqsd directions --model ...`")
    model = _lora_on_hidden_48()
    with pytest.raises(ValueError, match=want):
        trainer(model, random_samples(4), tmp_path / "run", [SQSDCallback([danger])], steps=1).train()
    with pytest.raises(ValueError, match=want):
        score_samples(model, random_samples(2), [danger], progress=False)


def test_sqsd_score_with_an_adapter_for_another_size(tmp_path, capsys, gguf_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sqsd_lab.cli import main
    model = tmp_path / "model48"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(gguf_tokenizer), hidden_size=48, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)).save_pretrained(model)
    gguf_tokenizer.save_pretrained(model)
    adapter = tmp_path / "adapter32"
    torch_model = LlamaForCausalLM(LlamaConfig(vocab_size=len(gguf_tokenizer), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(torch_model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
                   ).save_pretrained(adapter)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": "hello there"}) + "\n")
    argv = ["score", str(data), "--model", str(model), "--danger", str(adapter), "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"adapter {adapter} does not fit the model LlamaForCausalLM ({model})" in err
    assert "model.layers.0.self_attn.q_proj: 32×32 (out×in) in the adapter, 48×48 in the model" in err
    assert "sqsd directions --model" in err and "size mismatch" not in err
    assert main([*argv, "--at", "current"]) == 1  # every set at θ_0: the direction set's own check
    err = capsys.readouterr().err
    assert f"Direction set 'adapter32' ({adapter})" in err and "sqsd directions --model" in err


# ------------------------------------------------------------------ 3. an empty training set


def test_axolotl_plugin_refuses_an_empty_training_set(tmp_path):
    """The Trainer builds its sampler, and fails on 0 examples, before any callback event that could see the
    dataset (on_init_end gets no dataset, on_train_begin comes after the sampler): the plugin sees the trainer."""
    from sqsd_callback.integrations.axolotl import SQSDPlugin
    run = trainer(tiny_lora("llama"), [], tmp_path, steps=1)
    run.train_dataset = Dataset.from_dict({"input_ids": [], "labels": []})
    with pytest.raises(ValueError, match=r"The training set is empty \(0 examples"):
        SQSDPlugin().add_callbacks_post_trainer({}, run)


# ------------------------------------------------------------------ 4. bitsandbytes' kernel notice

AVX512_BF16 = '''
import importlib.abc, importlib.machinery, sys
class AVX512BF16(importlib.abc.MetaPathFinder):
    """bitsandbytes as on a CPU with AVX512-BF16 whose kernel download from the Hub fails."""
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, AVX512BF16())
try:
    import kernels
    def get_kernel(*args, **kwargs):
        raise RuntimeError("offline")
    kernels.get_kernel = get_kernel
except ImportError:
    pass
'''


@pytest.mark.slow  # two interpreters importing torch (and peft): about 15 s on 2 cores
def test_sqsd_commands_do_not_print_bitsandbytes_kernel_notice(tmp_path):
    """On such a CPU bitsandbytes logs "Failed to load CPU gemm_4bit_forward ..." whenever peft or the Trainer
    import it (the first run shows the simulation makes it say so); the sqsd commands keep it off stderr."""
    pytest.importorskip("bitsandbytes")
    bare = subprocess.run([sys.executable, "-c", AVX512_BF16 + "import bitsandbytes"], capture_output=True,
                          text=True, timeout=300)
    assert "Failed to load CPU gemm_4bit_forward" in bare.stderr, bare.stderr[-2000:]
    code = AVX512_BF16 + "from sqsd_lab.cli import main; sys.exit(main(sys.argv[1:]))"
    cli = subprocess.run([sys.executable, "-c", code, "score", str(tmp_path / "absent.jsonl"), "--out",
                          str(tmp_path / "o"), "--model", "embedded"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 1 and "sqsd score: error: no direction sets" in cli.stderr, cli.stderr[-2000:]
    assert "gemm_4bit" not in cli.stderr, cli.stderr[-2000:]


# ------------------------------------------------------------------ 5. the GGUF loader, public


def test_load_model_is_public_documented_and_lazy():
    import sqsd_lab
    from sqsd_lab import data
    assert sqsd_lab.load_model is data.load_model and sqsd_lab.load_tokenizer is data.load_tokenizer
    assert sqsd_lab.default_model_path is data.default_model_path
    assert {"load_model", "load_tokenizer", "default_model_path"} <= set(dir(sqsd_lab))
    doc = sqsd_lab.load_model.__doc__
    assert "dequantized" in doc and "You cannot perform fine-tuning on purely quantized models" in doc
    assert "load_model" in sqsd_lab.__doc__ and sqsd_lab.load_tokenizer.__doc__
    code = "import sys, sqsd_lab; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # the names load on first use


@pytest.mark.slow
def test_embedded_gguf_trains_through_load_model_not_through_gguf_file(tmp_path):
    """transformers 5's Trainer refuses the model from_pretrained(gguf_file=...) gives, at its __init__ (before any
    callback): with LoRA, "quantized with QuantizationMethod.GGUF but that quantization method do not support
    training"; load_model's model (the same weights, unmarked) builds a Trainer."""
    from transformers import AutoModelForCausalLM

    import sqsd_lab
    path = sqsd_lab.default_model_path()
    lora = LoraConfig(r=4, target_modules=["q_proj"])
    raw = get_peft_model(AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name), lora)
    if Version(transformers.__version__).major >= 5:  # 4.x loads the GGUF file unmarked and trains it
        with pytest.raises(ValueError, match="quantized with QuantizationMethod.GGUF but that quantization method "
                                             "do not support training"):
            trainer(raw, random_samples(2), tmp_path, steps=1)
    del raw
    model, _ = sqsd_lab.load_model()
    assert trainer(get_peft_model(model, lora), random_samples(2), tmp_path, steps=1).model is not None
