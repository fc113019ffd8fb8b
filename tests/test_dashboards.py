"""wandb views read back from an offline run; TensorBoard scalars; training unharmed without or despite wandb."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainingArguments
from wandb_files import offline_run

from sqsd_callback import SQSDCallback
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.tiny import random_samples, three_sets, tiny_lora, word_tokenizer

from helpers import CrashAtStep3, trainer


def _run(tmp_path, report_to, steps=4, trainer_kw=None, **cb_kw):
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    run = trainer(model, random_samples(8, seed=6), tmp_path, [SQSDCallback(danger, safety, **cb_kw)], steps=steps,
                  lr=1e-2, logging_steps=2, report_to=report_to, max_grad_norm=1.0, seed=42,
                  processing_class=word_tokenizer(), **(trainer_kw or {}))
    run.train()
    return run


def _assert_files_complete(tmp_path, steps=4):
    rows = read_jsonl(tmp_path / "sqsd" / "scores.jsonl")
    assert sorted({r["step"] for r in rows}) == list(range(steps)) and len(rows) == 2 * steps
    assert [d["step"] for d in read_jsonl(tmp_path / "sqsd" / "drift.jsonl")] == list(range(1, steps + 1))


@pytest.mark.slow
def test_wandb_offline_run_has_scalars_histogram_table_heatmap_and_config(tmp_path):
    """The run trains in a child process: wandb's service writes the offline run's files completely only when
    its process ends."""
    pytest.importorskip("wandb")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    code = (f"import sys, pathlib; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_dashboards import _run; "
            f"_run(pathlib.Path({str(tmp_path)!r}), ['wandb'], wandb_every=1, top_k=3)")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    run = offline_run(tmp_path)
    drift = {d["step"]: d["drift"] for d in read_jsonl(tmp_path / "sqsd" / "drift.jsonl")}
    scalars = [h for h in run["history"] if "train/sqsd/drift" in h]
    assert [h["train/global_step"] for h in scalars] == [2, 4]
    assert [h["train/sqsd/drift"] for h in scalars] == pytest.approx([drift[2], drift[4]])
    hists = [h for h in run["history"] if "sqsd/sqsd_hist/_type" in h]
    assert [h["train/global_step"] for h in hists] == [2, 4]
    assert all(sum(h["sqsd/sqsd_hist/values"]) == 4 for h in hists)  # 2 steps × 2 examples per window
    rows = read_jsonl(tmp_path / "sqsd" / "scores.jsonl")
    latest = {r["index"]: r for r in rows}
    top3 = sorted(latest.values(), key=lambda r: r["sqsd"], reverse=True)[:3]
    tables = sorted((run["dir"] / "files" / "media" / "table" / "sqsd").glob("riskiest_*.table.json"))
    last = max(tables, key=lambda p: int(p.name.split("_")[1]))
    table = json.loads(last.read_text())
    assert [row[0] for row in table["data"]] == [r["index"] for r in top3]
    assert [row[1] for row in table["data"]] == pytest.approx([r["sqsd"] for r in top3])
    texts = {r["index"]: r["text"] for r in read_jsonl(tmp_path / "sqsd" / "examples.jsonl")}
    assert table["data"][0][6] == texts[top3[0]["index"]][:200] and table["data"][0][6].startswith("w")
    assert list((run["dir"] / "files" / "media" / "images" / "sqsd").glob("layer_drift_*.png"))
    sets = run["config"]["sqsd"]["sets"]
    assert [s["key"] for s in sets] == ["danger/d1", "danger/d2", "safety/s1"] and all(s["norm"] > 0 for s in sets)


@pytest.mark.slow
def test_a_resumed_run_shows_the_texts_of_examples_seen_before_its_checkpoint(tmp_path, monkeypatch):
    """The wandb table's text column: the old code filled it only for examples first seen after the resume, so
    the riskiest examples from before the checkpoint showed empty text."""
    wandb = pytest.importorskip("wandb")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(name, value)

    def run(extra=(), resume=None):
        model = tiny_lora("llama")
        danger, safety = three_sets(model)
        cb = SQSDCallback(danger, safety)
        trainer(model, random_samples(8, seed=6), tmp_path, [cb, *extra], steps=4, report_to=["wandb"],
                save_strategy="steps", save_steps=2,
                processing_class=word_tokenizer()).train(resume_from_checkpoint=resume)
        return cb

    with pytest.raises(RuntimeError, match="simulated crash"):
        run([CrashAtStep3()])
    wandb.finish()
    cb = run(resume=True)
    wandb.finish()
    texts = {r["index"]: r["text"][:200] for r in read_jsonl(tmp_path / "sqsd" / "examples.jsonl")}
    sink = next(s for s in cb.run.sinks if type(s).__name__ == "WandbSink")
    assert len(texts) == 8 and sink.texts == texts


def test_tensorboard_gets_the_scalars_with_wandb_hidden(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails, as if not installed
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    # transformers < 5's TensorBoardCallback ignores the variable and writes to TrainingArguments.logging_dir
    legacy = "logging_dir" in TrainingArguments.__dataclass_fields__
    run = _run(tmp_path, ["tensorboard"], trainer_kw={"logging_dir": str(tmp_path / "tb")} if legacy else None)
    order = [type(c).__name__ for c in run.callback_handler.callbacks]  # not moved: the reporter runs before it
    assert order.index("TensorBoardCallback") < order.index("SQSDCallback")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    scalars = {}
    for events in (tmp_path / "tb").rglob("events.out.tfevents.*"):  # the Trainer's file and sqsd's own
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    drift = {d["step"]: d["drift"] for d in read_jsonl(tmp_path / "sqsd" / "drift.jsonl")}
    assert scalars["train/sqsd/drift"] == pytest.approx({2: drift[2], 4: drift[4]}, rel=1e-6)
    assert set(scalars["train/loss"]) == {2, 4}  # the Trainer's own scalars, in the same folder
    _assert_files_complete(tmp_path)


@pytest.mark.slow
def test_wandb_failing_mid_run_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    real_log, calls = wandb.sdk.wandb_run.Run.log, []

    def flaky(self, data, *a, **kw):  # sqsd's own payloads fail; the Trainer's scalars still go out
        if "sqsd/sqsd_hist" in data or "sqsd/riskiest" in data:
            calls.append(data)
            raise ConnectionError("wandb backend went away")
        return real_log(self, data, *a, **kw)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", flaky)
    with pytest.warns(UserWarning, match="wandb logging failed") as record:
        trainer = _run(tmp_path, ["wandb"], steps=6)
    wandb.finish()
    assert sum("wandb logging failed" in str(w.message) for w in record) == 1 and len(calls) == 1
    assert trainer.state.global_step == 6
    assert all("sqsd/drift" in h for h in trainer.state.log_history if "loss" in h)
    _assert_files_complete(tmp_path, steps=6)


def test_sinks_come_from_the_registry_and_an_unknown_report_to_name_is_refused(tmp_path):
    """A report_to name with a sink of its own gets it, one the Trainer reports to itself (mlflow) sees the scalars
    through the Trainer's logs, and any other name is an error listing the known ones."""
    from sqsd_callback.sinks import SinkContext, make_sinks
    run = SinkContext(tmp_path, None, {}, 10, {})
    made = make_sinks(["mlflow", "tensorboard"], run)
    assert [type(s).__name__ for s in made] == ["RunFiles", "TensorBoardSink"]
    for s in made:
        s.close()
    with pytest.raises(ValueError, match=r"report_to names \['no_such_backend'\].*'mlflow'.*'tensorboard'.*'wandb'"):
        make_sinks(["no_such_backend"], run)
