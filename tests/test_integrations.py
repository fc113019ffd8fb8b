"""The axolotl plugin and the shared YAML path: SQSDCallback built from a framework's config keys, checked by a
training run whose every step equals the batch-size-1 loop (tolerance 1e-5 × each key's scale, as test_every_step)."""

import copy

import pytest
import yaml

from sqsd_callback import SQSDCallback
from sqsd_callback.directions import DirectionSet
from sqsd_callback.integrations import callback_from_options
from sqsd_callback.integrations.axolotl import SQSDArgs, SQSDPlugin
from sqsd_lab.tiny import random_samples, tiny_lora

from helpers import ThetaEachStep, assert_every_step_matches_loop, trainer

AXOLOTL_YAML = """
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
adapter: lora
plugins:
  - sqsd_callback.integrations.axolotl.SQSDPlugin
sqsd_danger: [{danger}]
sqsd_safety: [{safety}]
sqsd:
  metric: projection
  drop_top_fraction: 0.25
"""


@pytest.fixture
def adapters(tmp_path):
    """Two LoRA adapters of the tiny model saved as PEFT folders (stand-ins for Hub direction releases)."""
    for name, seed in (("danger", 11), ("safety", 12)):
        tiny_lora("llama", seed=seed).save_pretrained(tmp_path / name)
    return tmp_path / "danger", tmp_path / "safety"


def test_axolotl_plugin_adds_the_configured_callback_and_it_scores_every_step(tmp_path, adapters):
    cfg = yaml.safe_load(AXOLOTL_YAML.format(danger=adapters[0], safety=adapters[1]))
    args = SQSDArgs(**{k: v for k, v in cfg.items() if k in SQSDArgs.model_fields})  # axolotl's schema check
    assert args.sqsd == {"metric": "projection", "drop_top_fraction": 0.25}
    plugin = SQSDPlugin()
    assert plugin.get_input_args() == "sqsd_callback.integrations.axolotl.SQSDArgs"
    model = tiny_lora("llama")
    samples, thetas, start = random_samples(12, seed=3), ThetaEachStep(), copy.deepcopy(model)
    run = trainer(model, samples, tmp_path / "run", [thetas], accum=2)
    (cb,) = plugin.add_callbacks_post_trainer(cfg, run)
    run.add_callback(cb)
    assert isinstance(cb, SQSDCallback) and cb.config.metric == "projection" and cb.policies[0].top_fraction == 0.25
    run.train()
    danger = DirectionSet.from_pretrained(adapters[0], kind="danger")
    safety = DirectionSet.from_pretrained(adapters[1], kind="safety")
    assert_every_step_matches_loop(start, samples, tmp_path / "run", thetas, [danger], [safety], "projection",
                                   keys=["danger", "safety", "sqsd"])


def test_axolotls_plugin_manager_loads_the_plugin_by_name(tmp_path, adapters):
    """Through axolotl's own PluginManager and DictDefault config, where axolotl is installed (CI does not install
    it: it pins its own transformers, peft and trl and CUDA-only kernels; run here with axolotl 0.19.0 installed
    --no-deps on the path)."""
    base = pytest.importorskip("axolotl.integrations.base")
    from axolotl.utils.dict import DictDefault
    manager = base.PluginManager.get_instance()
    manager.register("sqsd_callback.integrations.axolotl.SQSDPlugin")
    plugin = manager.plugins["sqsd_callback.integrations.axolotl.SQSDPlugin"]
    assert isinstance(plugin, base.BasePlugin) and isinstance(plugin, SQSDPlugin)
    assert "sqsd_callback.integrations.axolotl.SQSDArgs" in manager.get_input_args()
    cfg = DictDefault(yaml.safe_load(AXOLOTL_YAML.format(danger=adapters[0], safety=adapters[1])))
    model = tiny_lora("llama")
    callbacks = manager.add_callbacks_post_trainer(cfg, trainer(model, random_samples(4), tmp_path / "run"))
    assert [type(c).__name__ for c in callbacks] == ["SQSDCallback"]


def test_config_mistakes_are_named_before_any_model_loads(adapters):
    with pytest.raises(ValueError, match="drop_top_fracton"):
        callback_from_options({"sqsd_danger": [str(adapters[0])], "sqsd": {"drop_top_fracton": 0.1}})
    with pytest.raises(TypeError, match="sqsd_safety must be a list"):
        callback_from_options({"sqsd_safety": 3})
    with pytest.raises(FileNotFoundError, match="no/such"):
        callback_from_options({"sqsd_danger": ["./no/such"]})
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['sqsd_dangr'\]"):  # else the run has no danger set
        callback_from_options({"sqsd_dangr": [str(adapters[0])], "sqsd_safety": [str(adapters[1])]})


CHAT = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}")
"""A chat template over the word tokenizer: each turn its role (an unknown word, id 2), then its content."""


def test_sqsd_mask_key_builds_the_mask_from_prompt_response_records_with_the_runs_template(tmp_path, adapters):
    """``sqsd_mask`` records are tokenized with the trainer's tokenizer and chat template, cut at axolotl's
    ``sequence_len``, the loss on the response only; checked against ids written out by hand."""
    from sqsd_callback.policies import SafetyMask
    from sqsd_lab.tiny import word_tokenizer
    tok = word_tokenizer()
    tok.chat_template = CHAT
    path = tmp_path / "refusals.jsonl"
    path.write_text('{"prompt": "w5 w6", "response": "w7 w8 w9"}\n\n'
                    '{"prompt": "w10", "response": "w11 w12 w13 w14 w15"}\n')
    cfg = yaml.safe_load(AXOLOTL_YAML.format(danger=adapters[0], safety=adapters[1]) + f"sqsd_mask: {path}\n"
                         "sequence_len: 7\n")
    SQSDArgs(**{k: v for k, v in cfg.items() if k in SQSDArgs.model_fields})
    run = trainer(tiny_lora("llama"), random_samples(4), tmp_path / "run", processing_class=tok)
    (cb,) = SQSDPlugin().add_callbacks_post_trainer(cfg, run)
    (mask,) = [p for p in cb.policies if isinstance(p, SafetyMask)]
    # "user w5 w6 assistant" then the response; the second response cut to fit sequence_len 7
    expected = [([2, 5, 6, 2, 7, 8, 9], 4), ([2, 10, 2, 11, 12, 13, 14], 3)]
    assert [(r["input_ids"], r["labels"]) for r in mask.records] == \
        [(ids, [-100] * n + ids[n:]) for ids, n in expected]
    run.add_callback(cb)
    run.train()  # the mask is built from them and trains (its every-step math: test_masking)
    assert mask.scalars()["sqsd/mask_removed"] > 0 and mask.basis


def test_sqsd_mask_mistakes_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no safety records at .*nope.jsonl"):
        callback_from_options({"sqsd_mask": str(tmp_path / "nope.jsonl")})
    with pytest.raises(TypeError, match="sqsd_mask must be the path"):
        callback_from_options({"sqsd_mask": ["a", "b"]})
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "w5", "response": "w6"}\n')
    with pytest.raises(ValueError, match="safety record 0 is a prompt/response pair: pass the tokenizer"):
        callback_from_options({"sqsd_mask": str(path)})
    path.write_text('{"question": "w5", "answer": "w6"}\n')
    with pytest.raises(ValueError, match=r"safety record 0 has \['answer', 'question'\]: each record needs"):
        callback_from_options({"sqsd_mask": str(path)})
