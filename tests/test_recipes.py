"""The recipes expose what a user tunes: sft_with_monitor.py has one option per SQSDConfig field, and a YAML file
of options with command-line overrides builds the same SQSDConfig as the keywords would."""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import fields
from pathlib import Path

import pytest

from sqsd_callback import SQSDConfig

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "sft_with_monitor.py"
if not RECIPE.is_file():
    pytest.skip("not in a clone: an sdist holds no recipes/", allow_module_level=True)


def _recipe():
    spec = importlib.util.spec_from_file_location("sft_with_monitor", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(recipe, argv):
    p = argparse.ArgumentParser()
    p.add_argument("--sqsd-config", default=None)
    recipe.add_config_options(p)
    return p.parse_args(argv)


def test_every_sqsdconfig_option_is_a_flag():
    recipe = _recipe()
    p = argparse.ArgumentParser()
    recipe.add_config_options(p)
    flags = {a.dest for a in p._actions}
    assert {f.name for f in fields(SQSDConfig)} <= flags


def test_recommended_drops_from_flags_and_yaml(tmp_path):
    recipe = _recipe()
    want = SQSDConfig(drop_zscore_above=3.0, drop_zscore_robust=True, drop_min_history=8, exclude_dropped=True)
    flags = ["--drop-zscore-above", "3", "--drop-zscore-robust", "--drop-min-history", "8", "--exclude-dropped"]
    assert recipe.config_from(_parse(recipe, flags)) == want
    yaml = tmp_path / "sqsd.yaml"
    yaml.write_text("drop_zscore_above: 2.0\ndrop_zscore_robust: true\ndrop_min_history: 8\nexclude_dropped: true\n")
    got = recipe.config_from(_parse(recipe, ["--sqsd-config", str(yaml), "--drop-zscore-above", "3"]))
    assert got == want  # the command line wins over the file
    assert recipe.config_from(_parse(recipe, [])) == SQSDConfig()


def test_optional_ints_and_lists_parse_to_their_types():
    """--mask-rank 4 is an int and --mask-modules a list (the config refuses a string), as in a YAML file."""
    recipe = _recipe()
    opts = _parse(recipe, ["--mask-rank", "4", "--mask-modules", "mlp.down_proj, mlp.up_proj", "--drop-top-fraction",
                           "0.1"])
    config = recipe.config_from(opts)
    assert (config.mask_rank, config.mask_modules, config.drop_top_fraction) == (4, ["mlp.down_proj", "mlp.up_proj"],
                                                                                  0.1)
