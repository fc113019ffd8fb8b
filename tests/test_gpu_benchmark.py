"""benchmarks/gpu.py, the script a lent GPU runs, stays runnable where no GPU is: its smoke size on CPU writes every
section, its agreement rows equal the batch-size-1 loop (fp32 on CPU: to 1e-5 of each key's scale, as the
every-step tests hold them), and it imports no TRL (the GPU image has none)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
if not SCRIPT.is_file():
    pytest.skip("not in a clone: an sdist holds no benchmarks/", allow_module_level=True)


def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    probe = ("import runpy, sys; sys.argv = sys.argv[1:]; "
             "runpy.run_path(sys.argv[0], run_name='__main__'); "
             "print('imported trl:', 'trl' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe, str(SCRIPT), "--size", "smoke", "--seq", "32", "--batch", "2",
                           "--steps", "2", "--rounds", "1", "--offline-examples", "8",
                           "--sections", "agreement,lora,offline", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported trl: False" in proc.stdout
    result = json.loads(out.read_text())
    assert result["machine"]["device"] == "cpu"
    steps = result["agreement"]["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2] and all(s["rows"] == 8 for s in steps)
    assert max(s["max_err_vs_loop_fp32"] for s in steps) < 1e-5
    assert set(result["lora"]["step_time_ratio"]) == {"monitor", "drops"}
    assert result["offline"]["max_rel_diff_vs_loop"] < 1e-5
    assert "| offline hooks (batch 16) vs loop |" in proc.stdout
