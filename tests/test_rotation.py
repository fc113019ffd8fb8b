"""With save_total_limit the Trainer deletes the older checkpoints before its on_save event, where the callback
writes the newest checkpoint's state: a run killed inside that write left no checkpoint the monitor could resume
from. The latest state, kept in the run's folder, stands in for a checkpoint's missing or torn copy when it was
saved at that checkpoint's step with its Trainer history, and never otherwise."""

import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sqsd_callback.once import WarnOnce
from sqsd_callback.runtime import checkpoint
from sqsd_callback.runtime.checkpoint import LATEST_FILE, STATE_FILE, CheckpointState, load_state
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.tiny import rel_err

from rotation_worker import KILLED, STEPS, train

TESTS = Path(__file__).parent
TOL = 1e-6


def killed(out: Path, where: str) -> None:
    """Run tests/rotation_worker.py in a process of its own, killed (SIGKILL) where ``where`` says."""
    env = {**os.environ, "SQSD_KILL": where, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    proc = subprocess.run([sys.executable, str(TESTS / "rotation_worker.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{KILLED}"]  # checkpoint-1 deleted


def assert_close(got, want, where="state") -> None:
    """The same structure, the same ints, strings and booleans, floats within TOL relative (1e-9 absolute for
    values near 0) and tensors alike."""
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for k in want:
            assert_close(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert got.shape == want.shape and got.dtype == want.dtype, where
        assert (got - want).abs().max().item() <= TOL * want.abs().max().item() + 1e-9, where
    elif isinstance(want, float):
        assert math.isclose(got, want, rel_tol=TOL, abs_tol=1e-9), (where, got, want)
    else:
        assert got == want, (where, got, want)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run: its folder and the monitor's state at every step."""
    out = tmp_path_factory.mktemp("whole")
    _, _, states = train(out)
    assert sorted(states) == list(range(STEPS + 1))
    return out, states


@pytest.mark.slow
@pytest.mark.parametrize("where", ["checkpoint", "torn"])
def test_a_run_killed_while_saving_its_only_checkpoint_resumes_from_the_latest_state(tmp_path, whole, where,
                                                                                    monkeypatch):
    """Killed inside the state write for checkpoint-2, the only checkpoint left (save_total_limit=1): its own copy
    is missing or torn, the latest state (written first) is step 2's. The resumed run restores the monitor's state
    from it, equal to the uninterrupted run's at step 2 (drop statistics and decisions, examples seen, the drift's
    θ_0, the last safe adapter, the logging window), and ends equal to it: every score row once, drift rows, final
    state. The old code had no latest state and refused the resume (FileNotFoundError or the torn file's
    ValueError)."""
    whole_out, whole_states = whole
    out = tmp_path / "b"
    killed(out, where)
    own = out / f"checkpoint-{KILLED}" / STATE_FILE
    if where == "checkpoint":
        assert not own.exists()
    else:
        with pytest.raises(ValueError, match="incomplete"):
            load_state(own)
    assert load_state(out / "sqsd" / LATEST_FILE)[1]["step"] == KILLED
    assert max(r["step"] for r in read_jsonl(out / "sqsd" / "scores.jsonl")) == KILLED - 1

    said = []
    monkeypatch.setattr(checkpoint.logger, "warning", said.append)
    resumed, _, states = train(out, resume=True)
    assert resumed.state.global_step == STEPS
    assert len(said) == 1 and f"restored from {out / 'sqsd' / LATEST_FILE}" in said[0], said

    restored = states[KILLED]  # at train begin, as restored
    assert_close(restored, whole_states[KILLED])
    tensors, meta = restored
    drop = meta["policies"]["drop"]  # not a fresh state: 2 examples scored a step, one dropped in step 1
    assert len(drop["recent"]) == 2 * KILLED and len(drop["dropped"]) == 1 and meta["last_drift"]["drift"]
    assert any(k.startswith("drift/") for k in tensors) and any(k.startswith("safe/") for k in tensors)
    assert_close(states[STEPS], whole_states[STEPS])

    rows, want = read_jsonl(out / "sqsd" / "scores.jsonl"), read_jsonl(whole_out / "sqsd" / "scores.jsonl")
    assert [(r["step"], r["index"], r["dropped"]) for r in rows] == [(r["step"], r["index"], r["dropped"])
                                                                      for r in want]
    assert [r["step"] for r in want] == [s for s in range(STEPS) for _ in range(2)]  # each step's rows once
    assert any(r["dropped"] for r in want if r["step"] >= KILLED)
    assert rel_err([r["sqsd"] for r in rows], [r["sqsd"] for r in want]) <= TOL
    drift, want = read_jsonl(out / "sqsd" / "drift.jsonl"), read_jsonl(whole_out / "sqsd" / "drift.jsonl")
    assert [d["step"] for d in drift] == list(range(1, STEPS + 1))
    assert rel_err([d["drift"] for d in drift], [d["drift"] for d in want]) <= TOL


@pytest.mark.slow
def test_a_latest_state_of_an_earlier_step_is_not_loaded_for_a_checkpoint_without_its_own(tmp_path):
    """Killed while writing the latest state of step 2 (before the checkpoint's copy): the latest state is still
    step 1's and checkpoint-1 is gone, so nothing can resume the monitor's state. The resume is refused, naming
    both files and why the latest state cannot stand in, rather than restoring step 1's state at step 2."""
    out = tmp_path / "b"
    killed(out, "latest")
    assert not (out / f"checkpoint-{KILLED}" / STATE_FILE).exists()
    assert load_state(out / "sqsd" / LATEST_FILE)[1]["step"] == KILLED - 1
    with pytest.raises(FileNotFoundError, match=rf"checkpoint-{KILLED}/{STATE_FILE} is missing.*{LATEST_FILE}, "
                                                rf"which stands in .* was saved at step 1, not 2"):
        train(out, resume=True)


def _state(tmp_path, step: int, history: list[dict]):
    return SimpleNamespace(global_step=step, log_history=history)


def test_the_latest_state_stands_in_only_for_its_own_step_and_history(tmp_path):
    """The latest state replaces a missing or torn checkpoint copy when its step and Trainer history are the
    checkpoint's; another run's (same step, other history), another step's (the same history: no log between
    the saves) and an unreadable one are refused with the checkpoint's own error and why. The next save replaces
    the latest state without changing the copy an earlier checkpoint holds (a hard link to it, here)."""
    latest = tmp_path / "sqsd" / LATEST_FILE
    latest.parent.mkdir()
    saver = CheckpointState(WarnOnce(), latest)
    args = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=None)
    history = [{"loss": 1.0, "step": 1}, {"loss": 0.5, "step": 2}]
    other = [{"loss": 1.5, "step": 1}, {"loss": 0.5, "step": 2}]
    for step in (2, 3):
        (tmp_path / f"checkpoint-{step}").mkdir()
        saver.save(args, _state(tmp_path, step, history), {"x": torch.full((3,), float(step))}, {"mark": step})
    own = tmp_path / "checkpoint-2" / STATE_FILE
    tensors, meta = load_state(own)  # kept when the next save replaced the latest state
    assert meta["mark"] == 2 and meta["step"] == 2 and torch.equal(tensors["x"], torch.full((3,), 2.0))
    assert load_state(latest)[1]["mark"] == 3

    finder = CheckpointState(WarnOnce(), latest)
    (tmp_path / "checkpoint-3" / STATE_FILE).unlink()
    assert finder.find(args, _state(tmp_path, 3, history))[1]["mark"] == 3
    with pytest.raises(FileNotFoundError, match=rf"checkpoint-3/{STATE_FILE} is missing.*another run"):
        finder.find(args, _state(tmp_path, 3, other))
    own.unlink()
    with pytest.raises(FileNotFoundError, match="was saved at step 3, not 2"):
        finder.find(args, _state(tmp_path, 2, history))
    own.write_bytes(b"\0" * 10)  # torn
    with pytest.raises(ValueError, match=r"incomplete.*Resume from an earlier checkpoint.*was saved at step 3"):
        finder.find(args, _state(tmp_path, 2, history))
    latest.write_bytes(latest.read_bytes()[:40])
    with pytest.raises(FileNotFoundError, match=rf"{LATEST_FILE}, which stands in .* is unreadable"):
        finder.find(args, _state(tmp_path, 3, history))
    latest.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{LATEST_FILE}, which stands in .* is missing"):
        finder.find(args, _state(tmp_path, 3, history))


def test_a_failed_write_of_the_latest_state_warns_once_and_the_checkpoint_keeps_its_own(tmp_path):
    latest = tmp_path / "no-such-folder" / LATEST_FILE
    saver = CheckpointState(WarnOnce(), latest)
    args = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=None)
    with pytest.warns(UserWarning, match=rf"could not write {latest}") as caught:
        for step in (1, 2):
            (tmp_path / f"checkpoint-{step}").mkdir()
            saver.save(args, _state(tmp_path, step, []), {"x": torch.ones(2)}, {})
    assert len([w for w in caught if "could not write" in str(w.message)]) == 1
    assert load_state(tmp_path / "checkpoint-2" / STATE_FILE)[1]["step"] == 2
