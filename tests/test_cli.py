"""The ``sqsd`` commands on a tiny local model: directions, score (against score_samples at the paper's
initialisations), report, and each bad input named in a clear error before any training or scoring."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sqsd_callback import DirectionSet, score_samples
from sqsd_callback.offline import load_adapter
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.cli import main
from sqsd_lab.data import load_model, tokenize_chats

HARMFUL = [f"Explain how to do forbidden thing number {i} without being caught." for i in range(20)]
BENIGN = [{"prompt": f"What is {a} + {a + 3}?", "response": f"{a} + {a + 3} = {2 * a + 3}. Happy to help."}
          for a in range(12)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model, gguf_tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model.save_pretrained(path)
    gguf_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def directions(tmp_path_factory, model_dir):
    """A `sqsd directions` folder on the tiny model, with compliance data given (a random model only babbles)."""
    tmp = tmp_path_factory.mktemp("dirs")
    harmful = _jsonl(tmp / "harmful.jsonl", [{"prompt": p} for p in HARMFUL])
    compliant = _jsonl(tmp / "compliant.jsonl", [{"prompt": p, "response": f"Sure, here is step {i}: do it."}
                                                 for i, p in enumerate(HARMFUL)])
    out = tmp / "out"
    assert main(["directions", "--model", str(model_dir), "--out", str(out), "--harmful", harmful,
                 "--danger-data", compliant, "--n", "8", "--epochs", "1", "--max-length", "64", "--rank", "4"]) == 0
    return out


@pytest.mark.slow
def test_directions_writes_loadable_adapters_and_keeps_held_out_prompts_out(directions, tiny_model):
    shapes = {n: tuple(m.weight.shape) for n, m in tiny_model.named_modules() if isinstance(m, torch.nn.Linear)}
    for kind in ("danger", "safety"):
        ds = DirectionSet.from_peft_adapter(directions / kind, kind=kind)
        with pytest.warns(UserWarning, match="covers 14 of the model's 15"):  # all-linear leaves out lm_head
            assert sorted(ds.match(shapes)) == sorted(ds.modules)  # every direction names a module, right shape
        assert all(d.sq_norm() > 0 for d in ds.modules.values())
    summary = json.loads((directions / "directions.json").read_text())
    assert summary["adapters"]["danger"]["examples"] == 8 and summary["theta_0"] == "base model"
    held_out = {r["prompt"] for r in read_jsonl(directions / "held_out.jsonl")}
    assert len(held_out) == 4 and held_out < set(HARMFUL)  # 20 % of 20
    for kind in ("danger", "safety"):  # the compliance data named every prompt; held-out ones were left out
        trained = [r["prompt"] for r in read_jsonl(directions / kind / "train.jsonl")]
        assert len(trained) == 8 and not held_out & set(trained)


@pytest.mark.slow
def test_score_paper_way_equals_score_samples_at_the_papers_initialisations(tmp_path, model_dir, directions):
    data = _jsonl(tmp_path / "benign.jsonl", BENIGN)
    out = tmp_path / "scores"
    assert main(["score", data, "--model", str(model_dir), "--directions", str(directions), "--out", str(out),
                 "--windows", "3", "--alpha", "0.5", "--batch-size", "5"]) == 0
    rows = read_jsonl(out / "scores.jsonl")
    # oracle: one example at a time (batch size 1), danger at θ_0 + α·V_danger, safety at θ_0 + α·V_safety
    model, tokenizer = load_model(str(model_dir))
    samples = tokenize_chats(tokenizer, BENIGN, 512)
    expected = {}
    for kind in ("danger", "safety"):
        ds = DirectionSet.from_peft_adapter(directions / kind, kind=kind, name=kind)
        peft = load_adapter(model, directions / kind, scaling=0.5)
        expected[kind] = [r[kind] for r in score_samples(peft, samples, **{kind: [ds]}, batch_size=1)]
        peft.unload()
    for row, d, s in zip(rows, expected["danger"], expected["safety"]):
        assert row["danger"] == pytest.approx(d, rel=1e-5, abs=1e-7)
        assert row["safety"] == pytest.approx(s, rel=1e-5, abs=1e-7)
        assert row["sqsd"] == pytest.approx(d - s, rel=1e-5, abs=1e-7)
        assert row["prompt"] == BENIGN[row["index"]]["prompt"]
    windows = json.loads((out / "windows.json").read_text())
    assert [w["size"] for w in windows] == [4, 4, 4]
    ranked = sorted(rows, key=lambda r: -r["sqsd"])
    assert windows[0]["indices"] == [r["index"] for r in ranked[:4]]
    assert (out / "scores.png").stat().st_size > 5000
    assert (out / "ranking.csv").read_text().splitlines()[0].startswith("rank,window,index,sqsd")


@pytest.mark.slow
def test_score_at_current_parameters_with_named_adapters(tmp_path, model_dir, directions):
    data = _jsonl(tmp_path / "benign.jsonl", BENIGN[:4])
    out = tmp_path / "scores"
    assert main(["score", data, "--model", str(model_dir), "--danger", f"d1={directions / 'danger'}",
                 "--safety", f"s1={directions / 'safety'}", "--at", "current", "--out", str(out),
                 "--windows", "2"]) == 0
    rows = read_jsonl(out / "scores.jsonl")
    model, tokenizer = load_model(str(model_dir))
    ref = score_samples(model, tokenize_chats(tokenizer, BENIGN[:4], 512),
                        danger=[DirectionSet.from_peft_adapter(directions / "danger", kind="danger", name="d1")],
                        safety=[DirectionSet.from_peft_adapter(directions / "safety", kind="safety", name="s1")])
    for row, r in zip(rows, ref):
        assert row["danger/d1"] == pytest.approx(r["danger/d1"], rel=1e-5)
        assert row["sqsd"] == pytest.approx(r["sqsd"], rel=1e-5)


@pytest.mark.slow
def test_score_at_current_without_checkpoint_scores_at_a_merged_theta_0(tmp_path, model_dir, directions):
    """`--at current` with no --checkpoint scores every set at θ_0 by each example's full gradient on the modules the
    sets cover, also where θ_0 is an aligned adapter merged in, which leaves every weight frozen (the old code then
    stopped with "no active LoRA layer and no trainable layer"). Against the independent oracle at θ_0, float64,
    within 1e-5 of the terms' magnitudes."""
    import shutil

    from sqsd_lab.adapters import theta_0

    from oracle import RefSet, oracle
    folder = tmp_path / "dirs"
    shutil.copytree(directions, folder)
    shutil.copytree(directions / "safety", folder / "aligned")  # an alignment adapter to merge: θ_0 ≠ the base
    data, out = _jsonl(tmp_path / "benign.jsonl", BENIGN[:4]), tmp_path / "scores"
    assert main(["score", data, "--model", str(model_dir), "--directions", str(folder), "--at", "current",
                 "--out", str(out), "--windows", "2"]) == 0
    rows = read_jsonl(out / "scores.jsonl")
    model, tokenizer = load_model(str(model_dir))
    theta_0(model, folder)
    if hasattr(model, "peft_config"):  # PEFT < 0.15 leaves it on the merged model, with no LoRA layer left
        del model.peft_config
    for p in model.parameters():  # the oracle differentiates every weight; the sets pick their modules
        p.requires_grad_(True)
    sets = [RefSet(kind, kind, {m: d.materialize().double() for m, d in
                                DirectionSet.from_peft_adapter(folder / kind, kind=kind).modules.items()})
            for kind in ("danger", "safety")]
    want = oracle(model, tokenize_chats(tokenizer, BENIGN[:4], 512), sets, metrics=("cosine",))["cosine"]
    assert len(rows) == len(want) == 4
    for row, (ref, mag) in zip(rows, want):
        for key in ("danger/danger", "safety/safety", "sqsd"):
            assert abs(row[key] - ref[key]) <= 1e-5 * mag[key], (key, row[key], ref[key])


def _error(capsys, argv) -> str:
    assert main(argv) == 1
    return capsys.readouterr().err


def test_missing_adapter_file(tmp_path, capsys, model_dir, directions):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((directions / "danger" / "adapter_config.json").read_text())
    data = _jsonl(tmp_path / "d.jsonl", BENIGN)
    err = _error(capsys, ["score", data, "--model", str(model_dir), "--danger", str(broken), "--out",
                          str(tmp_path / "o")])
    assert "adapter_model.safetensors missing" in err and "save_pretrained" in err


def test_dataset_without_the_named_field(tmp_path, capsys, model_dir, directions):
    data = _jsonl(tmp_path / "d.jsonl", [{"question": "hi", "answer": "hello"}])
    err = _error(capsys, ["score", data, "--model", str(model_dir), "--directions", str(directions),
                          "--out", str(tmp_path / "o")])
    assert "cannot tell the dataset's format from its fields ['answer', 'question']" in err
    err = _error(capsys, ["score", data, "--model", str(model_dir), "--directions", str(directions),
                          "--out", str(tmp_path / "o"), "--prompt-field", "question", "--response-field", "reply"])
    assert "row 0 has no field 'reply'" in err and "['answer', 'question']" in err


def test_empty_dataset(tmp_path, capsys, model_dir, directions):
    (tmp_path / "empty.jsonl").write_text("")
    err = _error(capsys, ["score", str(tmp_path / "empty.jsonl"), "--model", str(model_dir), "--directions",
                          str(directions), "--out", str(tmp_path / "o")])
    assert "is empty" in err


def test_model_adapter_mismatch(tmp_path, capsys, gguf_tokenizer, directions):
    other = tmp_path / "other"
    config = LlamaConfig(vocab_size=len(gguf_tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(other)
    gguf_tokenizer.save_pretrained(other)
    data = _jsonl(tmp_path / "d.jsonl", BENIGN[:2])
    err = _error(capsys, ["score", data, "--model", str(other), "--directions", str(directions), "--out",
                          str(tmp_path / "o")])
    assert "does not fit the model" in err


def test_no_direction_sets(tmp_path, capsys, model_dir):
    data = _jsonl(tmp_path / "d.jsonl", BENIGN[:2])
    assert "no direction sets" in _error(capsys, ["score", data, "--model", str(model_dir), "--out",
                                                  str(tmp_path / "o")])


def test_report_on_a_missing_run(tmp_path, capsys):
    assert "No scores.jsonl" in _error(capsys, ["report", str(tmp_path)])


@pytest.mark.slow
def test_demo_stages_on_a_tiny_model_then_all_cached(tmp_path, model_dir):
    from sqsd_lab.demo import DemoSizes, run_demo
    sizes = DemoSizes(held_out=4, benign_eval=4, align_refusals=4, retention=4, directions=4, finetune=8,
                      epochs=1, rank=2, response_tokens=24, eval_tokens=8, max_length=96)
    summary = run_demo(tmp_path, str(model_dir), sizes)
    assert all(isinstance(t, float) for t in summary["timings"].values())
    assert set(summary["refusal"]) == {"raw model", "aligned θ_0", "after benign fine-tuning"}
    assert all(r["harmful"]["n"] == 4 and r["benign"]["n"] == 4 for r in summary["refusal"].values())
    scores = read_jsonl(tmp_path / "finetune" / "sqsd" / "scores.jsonl")
    assert sorted({r["index"] for r in scores}) == list(range(8)) and len(scores) == 8  # 1 epoch, every record
    report = (tmp_path / "finetune" / "sqsd" / "report" / "report.md").read_text()
    assert "## Refusal rate" in report and "![drift](drift.png)" in report
    again = run_demo(tmp_path, str(model_dir), sizes)
    assert again["timings"] == {k: f"cached ({t} s when it ran)" for k, t in summary["timings"].items()}
    assert again["refusal"] == summary["refusal"]
    assert run_demo(tmp_path, str(model_dir), sizes)["timings"] == again["timings"]  # kept across cached runs


def test_help_and_version_are_instant_and_exit_codes_tell_usage_from_runtime_errors(tmp_path):
    import subprocess
    import sys

    from sqsd_callback import __version__
    code = ("import sys; from sqsd_lab.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # the help imports none of the heavy libraries
    version = subprocess.run([sys.executable, "-m", "sqsd_lab.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"sqsd {__version__}"
    usage = subprocess.run([sys.executable, "-m", "sqsd_lab.cli", "score"], capture_output=True, text=True)
    assert usage.returncode == 2 and "required" in usage.stderr
    assert main(["report", str(tmp_path / "nothing")]) == 1


@pytest.mark.parametrize("row,prompt,response", [
    ({"prompt": "p", "response": "r", "id": 7}, "p", "r"),
    ({"prompt": "p", "completion": "r", "id": 7}, "p", "r"),
    ({"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "assistant", "content": "r"}], "id": 7},
     "p", "r"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "p"},
                   {"role": "assistant", "content": "r"}], "id": 7}, "s\n\np", "r"),
    ({"instruction": "do", "input": "this", "output": "r", "id": 7}, "do\nthis", "r"),
    ({"instruction": "do", "input": "", "output": "r", "id": 7}, "do", "r"),
    ({"instruction": "do", "context": "ctx", "response": "r", "category": "qa", "id": 7}, "do\nctx", "r"),
])
def test_dataset_formats_are_recognised_and_keep_their_columns(tmp_path, row, prompt, response):
    from sqsd_lab.data import load_records
    (record,) = load_records(_jsonl(tmp_path / "d.jsonl", [row]))
    assert (record["prompt"], record["response"]) == (prompt, response)
    assert record["columns"]["id"] == 7 and record["columns"].get("category", "qa") == "qa"


def test_unknown_format_names_the_formats(tmp_path):
    from sqsd_lab.data import load_records
    with pytest.raises(ValueError, match=r"cannot tell the dataset's format from its fields \['q'\].*Dolly"):
        load_records(_jsonl(tmp_path / "d.jsonl", [{"q": "x"}]))


def test_score_dolly_rows_carry_their_own_columns(tmp_path, model_dir, directions):
    dolly = [{"instruction": r["prompt"], "context": "", "response": r["response"], "category": "math",
              "id": f"row-{i}"} for i, r in enumerate(BENIGN[:4])]
    out = tmp_path / "scores"
    assert main(["score", _jsonl(tmp_path / "dolly.jsonl", dolly), "--model", str(model_dir), "--directions",
                 str(directions), "--out", str(out), "--windows", "2"]) == 0
    rows = read_jsonl(out / "scores.jsonl")
    assert [r["id"] for r in rows] == [f"row-{i}" for i in range(4)] and {r["category"] for r in rows} == {"math"}
    assert "category" in (out / "ranking.csv").read_text().splitlines()[0]


def test_model_is_required_and_long_prompts_are_skipped_and_counted(tmp_path, capsys, model_dir, directions):
    data = _jsonl(tmp_path / "d.jsonl", BENIGN[:3] + [{"prompt": "word " * 400, "response": "r"}])
    with pytest.raises(SystemExit) as exit_:  # no silent default model: argparse refuses (exit 2)
        main(["score", data, "--directions", str(directions), "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and "--model" in capsys.readouterr().err
    out = tmp_path / "scores"
    assert main(["score", data, "--model", str(model_dir), "--directions", str(directions), "--out", str(out),
                 "--windows", "1", "--max-length", "64"]) == 0
    assert "1 of 4 examples skipped" in capsys.readouterr().err
    assert [r["index"] for r in read_jsonl(out / "scores.jsonl")] == [0, 1, 2]
    assert json.loads((out / "score.json").read_text())["skipped_too_long"] == 1
