"""A 2-process DDP run on CPU (gloo): each rank scores its own examples, rank 0 writes one scores.jsonl."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sqsd_callback import score_samples
from sqsd_callback.sinks import read_jsonl
from sqsd_callback.testing import random_samples, rel_err, three_sets, tiny_lora

KEYS = ["danger", "safety", "sqsd", "danger/d1", "danger/d2", "safety/s1"]


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not found")
def test_two_process_run_writes_the_single_process_scores(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                           str(Path(__file__).with_name("ddp_worker.py")), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(tmp_path / "sqsd" / "scores.jsonl")
    # 2 ranks × 2 micro-batches × 2 examples per optimizer step, gathered into one file by rank 0
    assert [r["step"] for r in rows] == [0] * 8 + [1] * 8
    assert len({r["index"] for r in rows}) == 16
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    expected = score_samples(model, random_samples(16, seed=3), danger, safety, metric="projection", progress=False)
    first = [r for r in rows if r["step"] == 0]
    for k in KEYS:
        assert rel_err([r[k] for r in first], [expected[r["index"]][k] for r in first]) < 1e-5, k
    assert [d["step"] for d in read_jsonl(tmp_path / "sqsd" / "drift.jsonl")] == [1, 2]
