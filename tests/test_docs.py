"""The documentation runs as written: every Python snippet of the README and of docs/ is executed, page by page, on a
tiny model with direction sets saved where the snippets load them; every `sqsd` command line in them parses with the
real parser; the options table equals SQSDConfig's fields; every results file the pages cite exists."""

from __future__ import annotations

import copy
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "docs" / "index.md").is_file():
    pytest.skip("not in a clone: an sdist holds no docs/", allow_module_level=True)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?P<mark><!-- snippet: compile-only[^>]*-->\n)?```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def snippets(page: Path, lang: str) -> list[tuple[str, bool]]:
    """(code, compile_only) of each ``lang`` block on ``page``, in order."""
    return [(m["code"], bool(m["mark"])) for m in FENCE.finditer(page.read_text(encoding="utf-8")) if m["lang"] == lang]


def test_the_pages_have_snippets():
    """The extraction finds what is there: a regex that matched nothing would make every test below vacuous."""
    counts = {p.name: len(snippets(p, "python")) for p in PAGES}
    assert counts["getting-started.md"] >= 2 and counts["README.md"] >= 1, counts
    assert sum(counts.values()) >= 8, counts


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder laid out as the snippets expect: dirs/danger and dirs/safety (PEFT adapters of the tiny model),
    a clean monitored run's sqsd/ folder in clean_run/, and the paper's release in an offline Hub cache."""
    from peft import LoraConfig, get_peft_model

    from sqsd_lab.tiny import tiny_base, tiny_lora
    root = tmp_path_factory.mktemp("docs")
    for name, seed in (("danger", 11), ("safety", 12)):
        tiny_lora("llama", targets=TARGETS, seed=seed).save_pretrained(root / "dirs" / name)
    snapshot = root / "hub" / "models--Wxxxx--SQSD" / "snapshots" / ("0" * 40)
    for sub, seed in (("Beaver-Danger", 13), ("Ageis_Danger", 14), ("PKURLHF-10K_Safety", 15)):
        tiny_lora("llama", targets=TARGETS, seed=seed).save_pretrained(snapshot / "Direction" / sub)
    (root / "hub" / "models--Wxxxx--SQSD" / "refs").mkdir()
    (root / "hub" / "models--Wxxxx--SQSD" / "refs" / "main").write_text("0" * 40)
    base = tiny_base("llama")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    _clean_run(get_peft_model(copy.deepcopy(base), lora), root)
    return root, base, lora


def _clean_run(model, root: Path) -> None:
    """A monitored run of the tiny model (monitor only) whose drift.jsonl the threshold snippet reads."""
    from transformers import Trainer, TrainingArguments

    from sqsd_callback import DirectionSet, SQSDCallback
    from sqsd_lab.tiny import pad_collator, random_samples
    sets = [DirectionSet.from_peft_adapter(root / "dirs" / k, kind=k) for k in ("danger", "safety")]
    args = TrainingArguments(output_dir=str(root / "clean_run"), max_steps=3, per_device_train_batch_size=4,
                             report_to=[], save_strategy="no", use_cpu=True, learning_rate=0.05)
    Trainer(model=model, args=args, train_dataset=random_samples(12), data_collator=pad_collator(),
            callbacks=[SQSDCallback(danger=sets[:1], safety=sets[1:])]).train()


def _namespace(root: Path, base, lora) -> dict:
    """What a user's script has when a page's snippets start: model, tokenizer, ds, args, lora, samples, and the
    danger and safety sets loaded as in Getting started."""
    from datasets import Dataset
    from trl import SFTConfig

    from sqsd_callback import DirectionSet
    from sqsd_lab.data import CHATML_TEMPLATE
    from sqsd_lab.tiny import random_samples, word_tokenizer
    g = torch.Generator().manual_seed(0)
    words = lambda k: " ".join(f"w{int(i)}" for i in torch.randint(3, 90, (k,), generator=g))  # noqa: E731
    ds = Dataset.from_list([{"prompt": words(4), "completion": " " + words(5)} for _ in range(16)])
    args = SFTConfig(output_dir=str(root / "run"), max_steps=2, per_device_train_batch_size=8, logging_steps=1,
                     report_to=[], save_strategy="no", use_cpu=True, bf16=False)
    danger, safety = (DirectionSet.from_peft_adapter(root / "dirs" / k, kind=k, name=n)
                      for k, n in (("danger", "beaver"), ("safety", "pku")))
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHATML_TEMPLATE  # as an instruct model's tokenizer has
    return {"model": copy.deepcopy(base), "tokenizer": tokenizer, "ds": ds, "args": args,
            "lora": copy.deepcopy(lora), "samples": random_samples(8), "danger": danger, "safety": safety,
            "__name__": "__docs__"}


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if snippets(p, "python")], ids=lambda p: p.name)
def test_python_snippets_run(page, workspace, monkeypatch):
    """Each page's snippets run in order in one namespace (later ones use earlier names), from the workspace."""
    import huggingface_hub.constants as hub
    root, base, lora = workspace
    monkeypatch.chdir(root)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    namespace = _namespace(root, base, lora)
    for i, (code, compile_only) in enumerate(snippets(page, "python")):
        compiled = compile(code, f"{page.name}, python snippet {i + 1}", "exec")
        if not compile_only:
            exec(compiled, namespace)


def _commands(page: Path) -> list[str]:
    """The `sqsd ...` command lines of a page's bash blocks, continuation lines joined."""
    lines = []
    for code, _ in snippets(page, "bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("sqsd "):
                lines.append(line)
    return lines


def test_sqsd_command_lines_parse():
    """Every documented `sqsd` invocation names a real subcommand with options the parser accepts."""
    from sqsd_lab.cli import build_parser
    commands = [c for p in PAGES for c in _commands(p)]
    assert len(commands) >= 5, commands
    for line in commands:
        try:
            build_parser().parse_args(shlex.split(line)[1:])
        except SystemExit as err:
            pytest.fail(f"documented command does not parse ({err.code}): {line}")


def test_yaml_snippets_hold_valid_options():
    """Every YAML block with an `sqsd:` mapping (the axolotl plugin's key) is a valid SQSDConfig."""
    import yaml

    from sqsd_callback import SQSDConfig
    blocks = [yaml.safe_load(code) for p in PAGES for code, _ in snippets(p, "yaml")]
    options = [b["sqsd"] for b in blocks if isinstance(b, dict) and "sqsd" in b]
    assert options, "no YAML block with sqsd options"
    for values in options:
        SQSDConfig.from_dict(values)


def test_options_table_matches_sqsdconfig():
    """docs/configuration.md's table is SQSDConfig's fields as they are (python docs/config_table.py rewrites it)."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import config_table
    finally:
        sys.path.pop(0)
    page = config_table.PAGE.read_text(encoding="utf-8")
    assert config_table.render(page) == page, "docs/configuration.md is out of date: run python docs/config_table.py"
    from dataclasses import fields

    from sqsd_callback import SQSDConfig
    for f in fields(SQSDConfig):
        assert f"| `{f.name}` |" in page, f.name


def test_cited_results_files_exist():
    """A number in the docs names the results file it comes from; each named file is in benchmarks/results."""
    cited = {name for p in PAGES for name in re.findall(r"[\w.-]+-cpu\.(?:md|json|png)", p.read_text())}
    assert cited, "no results file cited"
    missing = sorted(n for n in cited if not (ROOT / "benchmarks" / "results" / n).is_file())
    assert not missing, f"cited but not in benchmarks/results: {missing}"
    for name in cited:
        if name.endswith(".json"):
            json.loads((ROOT / "benchmarks" / "results" / name).read_text())
