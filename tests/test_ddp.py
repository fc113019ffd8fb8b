"""2-process DDP runs on CPU (gloo), one launch: each rank scores its own examples and rank 0 writes one
scores.jsonl whose every row equals the batch-size-1 loop at its step's θ; drops (every policy, decided on every
rank's rows) and the anchor give, at every step, the update of one single-process step on all ranks' kept examples
(default optimizer, accumulation 2, clipping active)."""

import json
from pathlib import Path

import pytest
import torch

from sqsd_callback.policies import DropPolicy
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.tiny import three_sets, tiny_lora

from ddp_worker import REFUSED, RUNS, SAMPLES, STEPS, TRAIN, anchor_set
from helpers import ThetaEachStep, assert_every_step_matches_loop, assert_steps_equal_kept_only, dense_asft, launch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Every run of ddp_worker.py in one 2-process launch."""
    out = tmp_path_factory.mktemp("ddp")
    launch(Path(__file__).with_name("ddp_worker.py"), out)
    return out


def _thetas(out: Path) -> ThetaEachStep:
    recorded = ThetaEachStep()
    recorded.theta = torch.load(out / "thetas.pt")
    return recorded


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_every_step(ddp_runs, tmp_path, name):
    out = ddp_runs / name
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    rows = read_jsonl(out / "sqsd" / "scores.jsonl")
    # 2 ranks × 2 micro-batches × 2 examples per optimizer step, gathered into one file by rank 0
    assert [r["step"] for r in rows] == [s for s in range(STEPS) for _ in range(8)]
    assert len({r["index"] for r in rows}) == 24
    thetas = _thetas(out)
    metric = RUNS[name][0].get("metric", "cosine")
    assert_every_step_matches_loop(model, SAMPLES, out, thetas, danger, safety, metric, STEPS)
    assert [d["step"] for d in read_jsonl(out / "sqsd" / "drift.jsonl")] == list(range(1, STEPS + 1))
    if not any(k.startswith("drop_") for k in RUNS[name][0]):  # monitoring only
        assert not any(r["dropped"] for r in rows)
        return

    # the decisions: the policy replayed on each micro-step's rows of both ranks, in rank order; the same state on
    # every rank
    options = {k.removeprefix("drop_"): v for k, v in RUNS[name][0].items() if k.startswith(("drop_", "exclude"))}
    replay = DropPolicy(**options)
    for s in range(STEPS):
        step = [r for r in rows if r["step"] == s]  # rank 0's two micro-batches, then rank 1's
        for k in range(2):
            micro = step[2 * k:2 * k + 2] + step[4 + 2 * k:6 + 2 * k]
            assert replay.decide(micro) == [r["dropped"] for r in micro], (s, k)
    states = [json.loads((out / f"drop-rank{r}.json").read_text()) for r in (0, 1)]
    assert states[0] == states[1] == replay.state_dict()
    assert 0 < sum(r["dropped"] for r in rows) < len(rows)

    penalty = None
    if "anchor_lambda" in RUNS[name][0]:
        dirs = {m: d.materialize() for m, d in anchor_set(model).modules.items()}
        penalty = lambda m: dense_asft(m, dirs, RUNS[name][0]["anchor_lambda"])  # noqa: E731
    assert_steps_equal_kept_only(tiny_lora("llama"), SAMPLES, rows, tmp_path, thetas, penalty=penalty, **TRAIN)


@pytest.mark.parametrize("name", list(REFUSED))
def test_drops_under_per_rank_token_normalisation_are_refused_before_the_first_step(ddp_runs, name):
    """average_tokens_across_devices=False: each rank divides its loss by its own scored tokens, so after DDP has
    averaged the ranks no rescaling of the sum gives the step without the dropped examples. The old code rescaled
    by the tokens over every process, silently inexact; now every rank refuses at the first step, θ unchanged."""
    for rank in (0, 1):
        result = json.loads((ddp_runs / name / f"refused-rank{rank}.json").read_text())
        assert result["error"] and "average_tokens_across_devices=True" in result["error"], result
        assert not result["moved"]
