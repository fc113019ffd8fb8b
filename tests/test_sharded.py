"""Sharded engines, 2 processes on CPU (gloo): DeepSpeed ZeRO-1, -2 and -3 (DeepSpeed's CPU accelerator, one launch)
and FSDP2 (one launch). Every row equals the batch-size-1 loop at its step's θ, every drift record equals dense math
on θ_s − θ_0 (θ_0 the real starting adapter, gathered), and the drift stop saves the last safe adapter whole; under
FSDP2, drops and the anchor give at every step the update of one single-process step on all ranks' kept examples.
The factors are checked to be partitioned (ZeRO-3) or DTensor shards (FSDP2), so a test cannot pass unsharded."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sqsd_callback import SQSDCallback
from sqsd_callback.runtime.distributed import Processes
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.tiny import three_sets, tiny_lora

from ddp_worker import TRAIN, anchor_set
from deepspeed_worker import SAMPLES, STAGES, STEPS
from fsdp_worker import RUNS as FSDP_RUNS
from helpers import (
    ThetaEachStep,
    assert_every_step_matches_loop,
    assert_steps_equal_kept_only,
    at,
    dense_asft,
    dense_drift_cosines,
    launch,
    trainable,
    trained_weights,
    trainer,
)


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers < 5 builds the LR scheduler before DeepSpeed drops a LoRA model's empty parameter "
                    "group, and its first step fails in the scheduler (without SQSDCallback too)")
    out = tmp_path_factory.mktemp("deepspeed")
    launch(Path(__file__).with_name("deepspeed_worker.py"), out, DS_ACCELERATOR="cpu")
    return out


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    launch(Path(__file__).with_name("fsdp_worker.py"), out)
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", STAGES)
def test_zero_monitor_every_step(zero_runs, stage):
    out = zero_runs / f"zero{stage}"
    assert json.loads((out / "sharding.json").read_text())["partitioned"] == (stage == 3)
    assert_sharded_run_matches(out)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_monitor_every_step(fsdp2_run):
    out = fsdp2_run / "monitor"
    assert json.loads((out / "sharding.json").read_text()) == {"sharded": True, "factors": 12}
    assert_sharded_run_matches(out)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", [n for n in FSDP_RUNS if n != "monitor"])
def test_fsdp2_drops_and_anchor_every_step(fsdp2_run, tmp_path, name):
    """θ after each step (gathered) equals a single-process loop on every rank's kept examples, + the dense AsFT
    penalty (default optimizer, accumulation 2, clipping active), for LoRA and full fine-tuning; rows equal the
    batch-size-1 loop."""
    out = fsdp2_run / name
    make, options, _ = FSDP_RUNS[name]
    model = make("llama")
    trained = len(trainable(model))  # 12 LoRA factors, or 10 weights in full fine-tuning
    assert json.loads((out / "sharding.json").read_text()) == {"sharded": True, "factors": trained}
    thetas, rows = rows_match_loop(model, out)
    assert 0 < sum(r["dropped"] for r in rows) < len(rows)
    penalty = None
    if "anchor_lambda" in options:
        dirs = {m: d.materialize() for m, d in anchor_set(model).modules.items()}
        penalty = lambda m: dense_asft(m, dirs, options["anchor_lambda"])  # noqa: E731
    assert_steps_equal_kept_only(make("llama"), SAMPLES, rows, tmp_path, thetas, penalty=penalty, **TRAIN)


def rows_match_loop(model, out: Path) -> tuple[ThetaEachStep, list[dict]]:
    """(θ at every step, the rows) of a 2-process run in ``out``: 8 rows a step, each equal to the batch-size-1 loop
    at its step's θ."""
    thetas = ThetaEachStep()
    thetas.theta = torch.load(out / "thetas.pt")
    rows = read_jsonl(out / "sqsd" / "scores.jsonl")
    assert [r["step"] for r in rows] == [s for s in range(STEPS) for _ in range(8)]
    assert_every_step_matches_loop(model, SAMPLES, out, thetas, *three_sets(model), steps=STEPS)
    return thetas, rows


def assert_sharded_run_matches(out: Path) -> None:
    """Rows at every step against the loop, drift against dense math, the stop and its saved adapter."""
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    thetas, _ = rows_match_loop(model, out)

    drift = read_jsonl(out / "sqsd" / "drift.jsonl")
    assert [d["step"] for d in drift] == list(range(1, STEPS + 1))
    for d in drift:
        d0, dt = trained_weights(at(model, thetas.theta[0])), trained_weights(at(model, thetas.theta[d["step"]]))
        want = dense_drift_cosines({m: dt[m] - d0[m] for m in dt}, danger + safety)
        assert {k: d[k] for k in want} == pytest.approx(want, rel=1e-4, abs=1e-7), d["step"]

    stop = json.loads((out / "sqsd" / "stop.json").read_text())
    assert stop["step"] == STEPS and stop["last_safe_step"] == 0
    saved = load_file(str(out / "sqsd" / "last_safe" / "adapter_model.safetensors"))
    start = {k.replace(".default", ""): v for k, v in thetas.theta[0].items()}
    assert saved.keys() == start.keys() and all(torch.equal(saved[k], start[k]) for k in saved)
    assert any(float(start[k].abs().max()) > 0 for k in start if "lora_B" in k)  # the real start, not zeros


@pytest.mark.parametrize("procs,options,message", [
    (Processes(2, 0, "fsdp", fsdp_version=1), {}, "does not support FSDP1.*fsdp_version: 2"),
    (Processes(2, 0, "deepspeed", zero_stage=3), {"drop_top_fraction": 0.5}, "ZeRO-3 reduces, clips and steps"),
    (Processes(2, 0, "deepspeed", zero_stage=2), {"anchor_lambda": 1.0}, "under DeepSpeed they are not supported"),
    (Processes(2, 0, "fsdp", fsdp_version=2), {"engine": "vmap"}, "engine='vmap' runs extra passes"),
])
def test_unsupported_multi_process_combinations_are_refused_before_the_first_step(tmp_path, monkeypatch, procs,
                                                                                   options, message):
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    if "anchor_lambda" in options:
        options = dict(options, anchor=safety[0])
    monkeypatch.setattr(Processes, "current", classmethod(lambda cls: procs))
    before = trainable(model)
    run = trainer(model, SAMPLES, tmp_path, [SQSDCallback(danger, safety, **options)])
    with pytest.raises(ValueError, match=message):
        run.train()
    assert run.state.global_step == 0 and all(torch.equal(p, before[n]) for n, p in trainable(model).items())
