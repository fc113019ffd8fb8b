"""SQSDConfig: round trips, and bad input refused when the callback is built (before any training step) with a
message that names the option and the fix."""

import math
from pathlib import Path

import pytest

from sqsd_callback import SQSDCallback, SQSDConfig
from sqsd_callback.directions import DirectionSet
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.tiny import random_samples, three_sets, tiny_lora

from helpers import trainer


def test_round_trips_through_dict_json_and_yaml():
    cfg = SQSDConfig(metric="projection", drop_zscore_above=2.0, exclude_dropped=True, stop_drift_above=0.2,
                     save_last_safe=True, stop_patience=3)
    assert SQSDConfig.from_dict(cfg.to_dict()) == cfg
    assert SQSDConfig.from_json(cfg.to_json()) == cfg
    assert SQSDConfig.from_yaml(cfg.to_yaml()) == cfg
    assert SQSDConfig.from_yaml("") == SQSDConfig()
    as_path = SQSDConfig(output_dir=Path("runs") / "sqsd")  # a Path is kept as str: JSON and YAML can hold it
    assert SQSDConfig.from_json(as_path.to_json()) == as_path and as_path.output_dir == str(Path("runs") / "sqsd")
    assert SQSDConfig.from_yaml(as_path.to_yaml()) == as_path


def test_an_option_of_a_policy_that_is_off_is_refused_not_ignored():
    """anchor_lambda without an anchor set (the callback's argument, so checked there); the config-only cases are
    in test_bad_options_fail_when_built."""
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    with pytest.raises(ValueError, match=r"anchor_lambda=0.5 needs anchor=DirectionSet"):
        SQSDCallback(danger, safety, anchor_lambda=0.5)
    SQSDCallback(danger, safety, anchor=safety[0], anchor_lambda=0.5)
    SQSDCallback(danger, safety, stop_drift_above=0.1, stop_patience=3)
    SQSDCallback(danger, safety, drop_zscore_above=2.0, drop_min_history=8)


@pytest.mark.parametrize("options,error,message", [
    ({"drop_above": "0.5"}, TypeError, r"drop_above must be a number, got '0.5' \(str\); e.g. drop_above=0.5"),
    ({"drop_above": math.nan}, ValueError, "drop_above must be a finite number, got nan"),
    ({"stop_drift_above": math.inf}, ValueError, "stop_drift_above must be a finite number"),
    ({"drop_top_fraction": "0.1"}, TypeError, "drop_top_fraction must be a number, got '0.1'"),
    ({"drop_top_fraction": 1.0}, ValueError, r"drop_top_fraction must be in \(0, 1\), got 1.0"),
    ({"drop_zscore_above": -1}, ValueError, r"drop_zscore_above must be in \(0, inf\)"),
    ({"drop_above": True}, TypeError, "drop_above must be a number, got True"),
    ({"stop_patience": 0}, ValueError, "stop_patience must be at least 1, got 0"),
    ({"drop_min_history": 2.5}, TypeError, "drop_min_history must be a whole number"),
    ({"exclude_dropped": "yes"}, TypeError, "exclude_dropped must be True or False"),
    ({"metric": "cos"}, ValueError, "Unknown metric 'cos'; choose one of"),
    ({"engine": "fast"}, ValueError, "Unknown engine 'fast'; choose one of"),
    ({"drop_abov": 0.5}, ValueError, r"Unknown SQSDConfig option\(s\) \['drop_abov'\]; the options are"),
    ({"engine": "loop", "drop_above": 0.1}, ValueError, "only engine='hooks'"),
    ({"drop_zscore_robust": True}, ValueError, "drop_zscore_robust=True needs drop_zscore_above"),
    ({"drift_sample": 0}, ValueError, "drift_sample must be at least 1, got 0"),
    ({"stop_patience": 3}, ValueError, "stop_patience=3 needs stop_drift_above"),
    ({"drop_min_history": 8, "drop_above": 0.1}, ValueError, "drop_min_history=8 needs drop_zscore_above"),
])
def test_bad_options_fail_when_built(options, error, message):
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    with pytest.raises(error, match=message):
        SQSDCallback(danger, safety, **options)
    if "drop_abov" not in options:
        with pytest.raises(error, match=message):
            SQSDConfig(**options)


@pytest.mark.slow
def test_config_and_keywords_are_one_or_the_other_and_train_alike(tmp_path):
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    with pytest.raises(ValueError, match="either as config=SQSDConfig"):
        SQSDCallback(danger, safety, SQSDConfig(), metric="cosine")
    rows = []
    for name, cb in (("config", SQSDCallback(danger, safety, config=SQSDConfig(metric="projection",
                                                                                drop_top_fraction=0.5))),
                     ("keywords", SQSDCallback(danger, safety, metric="projection", drop_top_fraction=0.5))):
        trainer(tiny_lora("llama"), random_samples(4, seed=2), tmp_path / name, [cb], steps=1).train()
        rows.append(read_jsonl(tmp_path / name / "sqsd" / "scores.jsonl"))
    assert rows[0] == rows[1] and any(r["dropped"] for r in rows[0])


def test_the_same_adapter_as_danger_and_safety_is_refused(tmp_path):
    model = tiny_lora("llama")
    danger, _ = three_sets(model)
    danger[0].save(tmp_path / "d.safetensors")
    twin = DirectionSet.from_safetensors(tmp_path / "d.safetensors", kind="safety", name="twin")
    with pytest.raises(ValueError, match="Danger set 'd1' and safety set 'twin' hold the same directions"):
        SQSDCallback([danger[0]], [twin])
