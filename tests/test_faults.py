"""Nothing lost, nothing silent: a torn state file is named with the way out, the state is never pickled and is
written atomically, and a failing score log warns once while training (and its drops) go on."""

import errno
import json
import warnings

import pytest
import torch

from sqsd_callback import SQSDCallback
from sqsd_callback.runtime.checkpoint import LATEST_FILE, STATE_FILE, load_state
from sqsd_callback.runtime.run_folder import RunFolder, start_run_dir
from sqsd_callback.sinks import files, read_jsonl
from sqsd_callback.sinks.files import JsonlWriter
from sqsd_lab.tiny import random_samples, three_sets, tiny_lora

from helpers import trainable, trainer, unchanged


def _run(out, steps=2, resume=None, **kw):
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    cb = SQSDCallback(danger, safety, drop_top_fraction=0.5, stop_drift_above=10.0, save_last_safe=True)
    run = trainer(model, random_samples(8, seed=4), out, [cb], steps=steps, save_strategy="steps", save_steps=2,
                  **kw)
    run.train(resume_from_checkpoint=resume)
    return run, cb


def test_state_is_safetensors_with_json_header(tmp_path):
    _run(tmp_path)
    tensors, meta = load_state(tmp_path / "checkpoint-2" / STATE_FILE)
    assert any(k.startswith("drift/") for k in tensors) and any(k.startswith("safe/") for k in tensors)
    assert meta["has_safe"] and json.dumps(meta)  # plain JSON, no pickle
    with open(tmp_path / "checkpoint-2" / STATE_FILE, "rb") as f:
        assert not f.read(2).startswith(b"PK")  # not a torch.save zip archive


@pytest.mark.slow
def test_torn_state_file_is_named_with_the_way_out(tmp_path):
    _run(tmp_path)
    (state,) = (tmp_path / "checkpoint-2").glob("sqsd_state.*")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # killed while saving
    with pytest.raises(ValueError, match=rf"{state}.*incomplete.*Resume from an earlier checkpoint"):
        _run(tmp_path, steps=4, resume=str(tmp_path / "checkpoint-2"))


def test_kill_while_saving_leaves_no_torn_state(tmp_path, monkeypatch):
    import safetensors.torch

    def killed(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise KeyboardInterrupt  # the process dies mid-write
    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    assert not (tmp_path / "checkpoint-2" / STATE_FILE).exists()  # only the temporary file was touched


def test_failing_score_log_warns_once_and_training_and_drops_go_on(tmp_path, monkeypatch):
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def full_disk_for_scores(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        return Full(f) if str(path).endswith("scores.jsonl") else f
    monkeypatch.setattr(files, "open", full_disk_for_scores, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run, cb = _run(tmp_path, steps=3)
    failed = [w for w in caught if "could not write to" in str(w.message)]
    assert len(failed) == 1 and "scores.jsonl" in str(failed[0].message)
    assert run.state.global_step == 3
    assert sum(h["sqsd/dropped"] for h in run.state.log_history if "sqsd/dropped" in h) == 3  # 1 per step
    assert len(list((tmp_path / "sqsd").glob("drift.jsonl"))) == 1  # the other logs are complete
    assert torch.is_tensor(next(iter(cb.run.drift.state_tensors().values())))


def test_a_score_log_that_cannot_be_finished_warns_at_close(tmp_path):
    """Rows buffered after a failed write are flushed at close; a disk still full there used to end train()."""
    writer = JsonlWriter(tmp_path / "scores.jsonl")
    writer._f.close()

    class Full:
        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    writer._f = Full()
    with pytest.warns(UserWarning, match="could not finish .*scores.jsonl"):
        writer.close()


def test_a_full_disk_at_train_begin_is_refused_before_any_step_with_what_to_do(tmp_path, monkeypatch):
    """The old code raised the bare OSError of its first write (run.json), naming neither the folder's owner nor
    the fix."""
    from sqsd_callback.runtime import run_folder

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_folder, "start_run_dir", full)
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    start = trainable(model)
    with pytest.raises(OSError, match=r"SQSDCallback cannot write its files in .*sqsd \(No space left on device\): "
                                      r"free space there, or point SQSDConfig\(output_dir=...\)") as info:
        trainer(model, random_samples(4, seed=1), tmp_path, [SQSDCallback(danger, safety)], steps=2).train()
    assert info.value.errno == errno.ENOSPC and unchanged(model, start)


@pytest.mark.slow
def test_a_resume_whose_state_is_missing_says_so_not_that_the_disk_is_full(tmp_path):
    """The missing state is a FileNotFoundError naming the file, raised before any step; the train-begin guard for
    unwritable folders must not turn it into advice about free space."""
    samples = random_samples(4, seed=1)
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    trainer(model, samples, tmp_path, [SQSDCallback(danger, safety)], steps=2, save_strategy="steps",
            save_steps=2).train()
    (tmp_path / "checkpoint-2" / STATE_FILE).unlink()
    (tmp_path / "sqsd" / LATEST_FILE).unlink()  # else it would stand in for the missing state
    model = tiny_lora("llama")
    resumed = trainer(model, samples, tmp_path, [SQSDCallback(danger, safety)], steps=3, save_strategy="steps",
                      save_steps=2)
    with pytest.raises(FileNotFoundError, match=rf"checkpoint-2/{STATE_FILE} is missing.*{LATEST_FILE}.* is "
                                                rf"missing") as info:
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "free space" not in str(info.value)


@pytest.mark.parametrize("recorded,moved", [('{"step": 1}', False), ('{"step": 5}', True), ('{"step": 3', True),
                                            ("[]", True), ("null", True), ('{"step": "3"}', True)])
def test_a_resume_sets_aside_a_later_or_unreadable_stop_record(tmp_path, recorded, moved):
    """A stop.json from after the resumed step, torn or foreign goes to previous-1/ with the last-safe adapter
    (the old code raised TypeError on foreign contents); one from before it is the resumed history's own."""
    (tmp_path / "stop.json").write_text(recorded)
    (tmp_path / "last_safe").mkdir()
    RunFolder(tmp_path, main=True)._set_aside_later_stop(2)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == (["previous-1"] if moved else ["last_safe", "stop.json"])
    if moved:
        assert sorted(p.name for p in (tmp_path / "previous-1").iterdir()) == ["last_safe", "stop.json"]


def test_a_new_run_moves_every_result_of_the_last_one_past_the_highest_previous_folder(tmp_path):
    """The old code moved files only (a stale last_safe/ stayed beside the new run's files) and numbered the folder
    by counting, so a deleted previous-1 made the next run fail on an existing previous-2."""
    run = tmp_path / "sqsd"
    (run / "previous-2").mkdir(parents=True)
    (run / "last_safe").mkdir()
    (run / "scores.jsonl").write_text("{}\n")
    start_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == ["previous-2", "previous-3"]
    assert sorted(p.name for p in (run / "previous-3").iterdir()) == ["last_safe", "scores.jsonl"]


def test_all_labels_masked_warns(tmp_path):
    samples = [dict(s, labels=[-100] * len(s["labels"])) for s in random_samples(4, seed=1)]
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    with pytest.warns(UserWarning, match="No example of optimizer step 0 has a scored token"):
        trainer(model, samples, tmp_path, [SQSDCallback(danger, safety)], steps=1).train()


def test_report_of_a_run_with_safety_sets_only(tmp_path):
    from sqsd_lab.report import write_report
    model = tiny_lora("llama")
    _, safety = three_sets(model)
    trainer(model, random_samples(4, seed=1), tmp_path, [SQSDCallback(safety=safety)], steps=2).train()
    report = write_report(tmp_path).read_text()
    assert "| 1 |" in report and "riskiest" in report


def test_torn_direction_file_is_named(tmp_path):
    from sqsd_callback import DirectionSet
    model = tiny_lora("llama")
    danger, _ = three_sets(model)
    path = tmp_path / "d.safetensors"
    danger[0].save(path)
    path.write_bytes(path.read_bytes()[:100])  # an interrupted download
    with pytest.raises(ValueError, match=rf"{path} is not a readable safetensors file.*truncated"):
        DirectionSet.from_safetensors(path, kind="danger")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    from sqsd_lab.data import load_records
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": \n')
    with pytest.raises(ValueError, match=rf"{path}, line 3: not a JSON object"):
        load_records(path)


def test_a_missing_kind_is_none_in_scores_drift_and_logs_alike(tmp_path):
    """One combination of kinds (scoring.combine): with safety sets only, danger is None (null) in every score row
    and drift row, sqsd = −safety and drift = −drift_safety, and no sqsd/drift_danger reaches the logs."""
    from sqsd_lab.report import write_report
    from sqsd_lab.tiny import random_set

    model = tiny_lora("llama")
    run = trainer(model, random_samples(8, seed=2), tmp_path, [SQSDCallback(safety=[random_set(model, "safety", "s")])],
                  steps=2)
    run.train()
    rows, drift = read_jsonl(tmp_path / "sqsd" / "scores.jsonl"), read_jsonl(tmp_path / "sqsd" / "drift.jsonl")
    assert rows and all(r["danger"] is None and r["sqsd"] == -r["safety"] for r in rows)
    assert drift and all(d["drift_danger"] is None and d["drift"] == -d["drift_safety"] for d in drift)
    logged = [h for h in run.state.log_history if "loss" in h]
    assert logged and all("sqsd/drift_danger" not in h and "sqsd/drift_safety" in h for h in logged)
    assert "danger no set" in write_report(tmp_path / "sqsd").read_text()


def _fused_lora_forward(layer, share):
    """Replace a PEFT LoRA layer's forward by one that computes the same output without calling lora_A/lora_B as
    modules (as fused kernels such as unsloth's do)."""
    def forward(x, *args, **kwargs):
        out = layer.base_layer(x)
        if share:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            out = out + layer.scaling["default"] * (x @ a.T) @ b.T
        return out
    layer.forward = forward


@pytest.mark.parametrize("fused", ["all", "some"])
def test_fused_lora_kernels_are_refused_or_named_not_scored_as_zero(tmp_path, fused):
    """A model whose LoRA layers bypass their modules (fused kernels) gives the hooks nothing: refused at the first
    micro-batch when no layer ran as a module; a warning naming the layers when only some did."""
    from peft.tuners.lora.layer import LoraLayer

    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers if fused == "all" else layers[:2]:
        _fused_lora_forward(layer, share=True)
    run = trainer(model, random_samples(8, seed=2), tmp_path, [SQSDCallback(danger, safety)], steps=1)
    if fused == "all":
        with pytest.raises(RuntimeError, match="fused"):
            run.train()
    else:
        with pytest.warns(UserWarning, match="2 of 6 trained layers did not run as modules"):
            run.train()


def test_drops_refuse_a_model_that_trains_weights_outside_the_scored_layers(tmp_path):
    """Exact drops edit only the scored layers' gradients: another trainable parameter is refused by name at train
    start, before any step."""
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    model.get_submodule("base_model.model.model.norm").weight.requires_grad_(True)
    run = trainer(model, random_samples(4), tmp_path, [SQSDCallback(danger, safety, drop_top_fraction=0.25)],
                  steps=1)
    with pytest.raises(ValueError, match=r"also trains 1 other parameter.*model\.norm\.weight"):
        run.train()
    assert run.state.global_step == 0
