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
