"""``sqsd score`` at scale: two processes (torchrun, gloo) write the files one process writes; a run killed with
SIGKILL at any moment and started again with the same command loses and repeats nothing; a torn last line of a part
file is cut away; other settings or changed data are refused; records are read, tokenised and scored a chunk at a
time. On a tiny Llama with a word-level tokenizer and random LoRA danger and safety adapters (the paper's two
passes)."""

import csv
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sqsd_callback import offline
from sqsd_callback.offline import paper_passes, score_offline
from sqsd_callback.sinks import read_jsonl
from sqsd_lab import data
from sqsd_lab.adapters import folder_sets
from sqsd_lab.cli import main
from sqsd_lab.tiny import tiny_base, tiny_lora, word_tokenizer

N = 400  # records: a few seconds per run, so that a kill lands while rows are being written
ROOT = Path(__file__).resolve().parent.parent
SCORE_KEYS = ("danger", "safety", "sqsd", "danger/danger", "safety/safety")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny model folder, a directions folder with random danger/ and safety/ adapters, and N distinct records."""
    root = tmp_path_factory.mktemp("scale")
    tokenizer = word_tokenizer()
    tokenizer.chat_template = data.CHATML_TEMPLATE
    tiny_base("llama").save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for kind, seed in (("danger", 1), ("safety", 2)):
        tiny_lora("llama", seed=seed).save_pretrained(root / "dirs" / kind)
    rng = random.Random(0)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(3, 96)}" for _ in range(k))

    with open(root / "data.jsonl", "w") as f:
        for i in range(N):
            f.write(json.dumps({"prompt": f"w{3 + i % 90} w{3 + i // 90} {words(rng.randint(1, 10))}",
                                "response": words(rng.randint(2, 24)), "id": f"row-{i}"}) + "\n")
    return root


def _argv(ws: Path, out: Path, *extra: str, data_file: str = "data.jsonl") -> list[str]:
    return ["score", str(ws / data_file), "--model", str(ws / "model"), "--directions", str(ws / "dirs"), "--out",
            str(out), "--batch-size", "2", "--windows", "3", *extra]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, as each torchrun process has here (and faster on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(workspace) -> Path:
    """One uninterrupted run in this process."""
    assert main(_argv(workspace, workspace / "reference")) == 0
    return workspace / "reference"


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _close(got: float, want: float, scale: float, tol: float) -> bool:
    return abs(got - want) <= tol * max(abs(want), scale)


def assert_same_outputs(got: Path, want: Path, tol: float = 1e-6, exact_order: bool = True) -> None:
    """scores.jsonl, ranking.csv, windows.json and windows.csv of two runs hold the same rows in the same order,
    every score within ``tol`` relative (of the value, or for values near 0 of the key's largest magnitude). Without
    ``exact_order`` two examples whose SQSD differ by less than the tolerance may trade places in the ranking."""
    rows, ref = read_jsonl(got / "scores.jsonl"), read_jsonl(want / "scores.jsonl")
    assert [r["index"] for r in rows] == [r["index"] for r in ref] == list(range(N))
    scale = {k: max(abs(r[k]) for r in ref) for k in SCORE_KEYS}
    for r, w in zip(rows, ref):
        assert list(r) == list(w) and r["prompt"] == w["prompt"] and r["id"] == w["id"]
        assert all(_close(r[k], w[k], scale[k], tol) for k in SCORE_KEYS), (r, w)
    sqsd = {r["index"]: r["sqsd"] for r in ref}
    ranking, ref_ranking = _csv(got / "ranking.csv"), _csv(want / "ranking.csv")
    assert len(ranking) == len(ref_ranking) == N
    for g, w in zip(ranking, ref_ranking):
        assert (g["rank"], g["window"]) == (w["rank"], w["window"])
        assert _close(float(g["sqsd"]), float(w["sqsd"]), scale["sqsd"], tol)
        if g["index"] != w["index"]:  # a near-tie, in the other order
            assert not exact_order and _close(sqsd[int(g["index"])], float(w["sqsd"]), scale["sqsd"], 2 * tol)
    windows, ref_windows = (json.loads((p / "windows.json").read_text()) for p in (got, want))
    for g, w in zip(windows, ref_windows):
        assert [g[k] for k in ("window", "first_rank", "last_rank", "size")] == \
            [w[k] for k in ("window", "first_rank", "last_rank", "size")]
        assert all(_close(g[k], w[k], scale["sqsd"], tol) for k in ("sqsd_max", "sqsd_min", "sqsd_mean"))
        assert not exact_order or g["indices"] == w["indices"]
    assert len(windows) == len(ref_windows) == 3
    assert [r["window"] for r in _csv(got / "windows.csv")] == [r["window"] for r in _csv(want / "windows.csv")]


def assert_parts_whole(out: Path, passes: int = 2) -> None:
    """Every pass's part files hold each example exactly once, every line whole."""
    for k in range(passes):
        lines = [line for p in sorted((out / "parts").glob(f"pass{k}-rank*.jsonl"))
                 for line in p.read_bytes().splitlines(keepends=True)]
        assert all(line.endswith(b"\n") for line in lines)
        assert sorted(json.loads(line)["index"] for line in lines) == list(range(N)), k


def test_one_process_equals_score_offline(workspace, reference):
    """The independent path: score_offline on every sample at once, the paper's two passes."""
    model, tokenizer = data.load_model(str(workspace / "model"))
    samples = data.tokenize_chats(tokenizer, data.load_records(workspace / "data.jsonl"), 512)
    pairs = folder_sets(workspace / "dirs")
    want = score_offline(model, samples, paper_passes([p for p in pairs if p[1].kind == "danger"],
                                                      [p for p in pairs if p[1].kind == "safety"]), batch_size=2)
    got = read_jsonl(reference / "scores.jsonl")
    assert [r["index"] for r in got] == [r["index"] for r in want] == list(range(N))
    scale = {k: max(abs(r[k]) for r in want) for k in SCORE_KEYS}
    for g, w in zip(got, want):
        assert all(_close(g[k], w[k], scale[k], 1e-6) for k in SCORE_KEYS), (g, w)
    assert got[7]["id"] == "row-7" and got[7]["prompt"].startswith("w10 w3 ")
    assert_parts_whole(reference)
    about = json.loads((reference / "score.json").read_text())
    assert about["processes"] == 1 and about["examples"] == N and about["skipped_too_long"] == 0


@pytest.mark.distributed
def test_two_processes_write_the_files_one_process_writes(workspace, reference):
    out = workspace / "two"
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                           str(port), "-m", "sqsd_lab.cli", *_argv(workspace, out)], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_outputs(out, reference)  # same batches, same rows, same order
    assert {p.name for p in (out / "parts").glob("*.jsonl")} == \
        {f"pass{k}-rank{r}.jsonl" for k in (0, 1) for r in (0, 1)}
    assert all(len(p.read_text().splitlines()) == N // 2 for p in (out / "parts").glob("*.jsonl"))  # 100 batches each
    assert json.loads((out / "score.json").read_text())["processes"] == 2
    assert "sqsd score pass 2/2 (safety/safety)" in proc.stderr  # rank 0's bar names the pass


def _rows_written(out: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in (out / "parts").glob("pass*-rank*.jsonl"))


def _kill_when(proc: subprocess.Popen, ready, delay: float) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` first holds."""
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, "the run ended before it was killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(delay)
    proc.kill()
    proc.wait()


def test_a_run_killed_at_any_moment_goes_on_where_it_stopped(workspace, reference, tmp_path):
    """SIGKILL while the first rows of pass 1 are written, at a random moment once a restart has written more, and
    at a random moment in pass 2; then the same command again: the files equal an uninterrupted run's, and each
    example is in each pass's part files once."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sqsd_lab.cli", *_argv(workspace, out)]
    rng = random.Random(0)
    written = [0]
    moments = [(lambda: _rows_written(out) > 0, rng.uniform(0, 0.2)),
               (lambda: _rows_written(out) > written[-1], rng.uniform(0, 1.5)),
               (lambda: _rows_written(out) > max(written[-1], N), rng.uniform(0, 1.0))]  # in pass 2
    for ready, delay in moments:
        proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_when(proc, ready, delay)
        written.append(_rows_written(out))
    assert 0 < written[1] < written[2] < written[3] < 2 * N and written[3] > N, written  # each left work to do
    assert main(_argv(workspace, out)) == 0
    assert_same_outputs(out, reference, tol=1e-5, exact_order=False)  # a torn batch's rest is rescored alone
    assert_parts_whole(out)


def test_a_torn_last_line_is_cut_away(workspace, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    part = out / "parts" / "pass1-rank0.jsonl"
    lines = part.read_bytes().splitlines(keepends=True)
    part.write_bytes(b"".join(lines[:-6]) + lines[-6][: len(lines[-6]) // 2])  # the last 6 rows lost, one half-written
    for name in ("scores.jsonl", "ranking.csv"):
        (out / name).unlink()
    assert main(_argv(workspace, out)) == 0
    assert_parts_whole(out)
    assert part.read_bytes().splitlines(keepends=True)[:-6] == lines[:-6]  # the whole rows kept as they were
    assert_same_outputs(out, reference, tol=1e-5, exact_order=False)


def test_other_settings_or_changed_data_are_refused(workspace, tmp_path, capsys):
    """Settings that change the scores are refused, naming each change and --fresh; batch sizes may change; a
    changed example is refused by its tokens; --fresh starts over."""
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws, ignore=shutil.ignore_patterns("reference", "two"))
    lines = (ws / "data.jsonl").read_text().splitlines(keepends=True)
    (ws / "small.jsonl").write_text("".join(lines[:12]))
    out = tmp_path / "out"
    assert main(_argv(ws, out, data_file="small.jsonl")) == 0
    before = read_jsonl(out / "scores.jsonl")
    capsys.readouterr()
    assert main(_argv(ws, out, "--alpha", "0.3", "--max-length", "256", data_file="small.jsonl")) == 1
    err = capsys.readouterr().err
    assert "holds the rows of a run with other settings" in err and "alpha was 0.5, now 0.3" in err
    assert "max_length was 512, now 256" in err and "--fresh" in err
    time.sleep(0.01)
    (ws / "dirs" / "safety" / "adapter_model.safetensors").touch()  # a retrained adapter
    assert main(_argv(ws, out, data_file="small.jsonl")) == 1
    assert f"the files of {(ws / 'dirs' / 'safety').resolve()} changed" in capsys.readouterr().err
    assert main(_argv(ws, out, "--fresh", data_file="small.jsonl")) == 0  # scored anew
    assert main(_argv(ws, out, "--batch-size", "5", "--max-tokens", "64", data_file="small.jsonl")) == 0
    assert read_jsonl(out / "scores.jsonl") == before
    edited = json.loads(lines[3]) | {"response": "w4 w5 w6"}
    (ws / "small.jsonl").write_text("".join(lines[:3] + [json.dumps(edited) + "\n"] + lines[4:12]))
    assert main(_argv(ws, out, data_file="small.jsonl")) == 1
    assert "example 3 is not the one the part files" in capsys.readouterr().err
    (ws / "small.jsonl").write_text("".join(lines[:10]))  # two records fewer
    assert main(_argv(ws, out, data_file="small.jsonl")) == 1
    assert "hold 2 examples the data no longer has" in capsys.readouterr().err


def test_records_are_read_tokenised_and_scored_a_chunk_at_a_time(workspace, reference, tmp_path, monkeypatch):
    """With chunks of 50 samples, batches form within each chunk and the first batch is scored once the first
    chunk is read, not the whole data; the scores equal the one-chunk run's."""
    monkeypatch.setattr(offline, "STREAM_CHUNK", 50)
    read, chunks, first_scored = [], [], []
    tokenize, batches, score = data.tokenize_chat, offline.length_batches, offline.BatchScorer.__call__
    monkeypatch.setattr(data, "tokenize_chat", lambda *a, **k: read.append(1) or tokenize(*a, **k))
    monkeypatch.setattr(offline, "length_batches",
                        lambda lengths, *a: chunks.append(len(lengths)) or batches(lengths, *a))
    monkeypatch.setattr(offline.BatchScorer, "__call__",
                        lambda self, *a: first_scored.append(len(read)) or score(self, *a))
    n = 150
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws, ignore=shutil.ignore_patterns("reference", "two"))
    (ws / "head.jsonl").write_text("".join((ws / "data.jsonl").read_text().splitlines(keepends=True)[:n]))
    assert main(_argv(ws, tmp_path / "out", data_file="head.jsonl")) == 0
    assert chunks == [50, 50, 50] * 2  # two passes, each over every chunk
    assert first_scored[0] <= 50 and len(read) == 2 * n  # the first batch scored before chunk 2 was read
    got, want = read_jsonl(tmp_path / "out" / "scores.jsonl"), read_jsonl(reference / "scores.jsonl")[:n]
    assert [r["index"] for r in got] == list(range(n))
    scale = {k: max(abs(r[k]) for r in want) for k in SCORE_KEYS}
    for g, w in zip(got, want):  # other batches, the same scores
        assert all(_close(g[k], w[k], scale[k], 1e-5) for k in SCORE_KEYS) and g["id"] == w["id"], (g, w)


def test_records_stream_from_jsonl_and_datasets(tmp_path, monkeypatch):
    """data.Records reads JSONL line by line (a bad line 3 shows only when reached) and a `datasets` folder without
    converting it whole; each iteration starts over and len() counts the rows."""
    import datasets

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\nnot json\n')
    records = data.Records(path)
    assert len(records) == 3 and next(iter(records))["prompt"] == "a" and next(iter(records))["prompt"] == "a"
    with pytest.raises(ValueError, match="line 3: not a JSON object"):
        list(records)
    datasets.Dataset.from_list([{"prompt": f"p{i}", "response": "r", "id": i} for i in range(5)]).save_to_disk(
        tmp_path / "ds")
    monkeypatch.setattr(datasets.Dataset, "to_list", lambda self: pytest.fail("read whole"))
    records = data.Records(tmp_path / "ds")
    assert len(records) == 5 and [r["columns"]["id"] for r in records] == list(range(5))
