"""Peak memory of `sqsd score` on long records at full depth: the embedded SmolLM2-135M-Instruct (30 layers, the
attention implementation it loads with), its `sqsd demo` directions, and real English text of 500–1,500 tokens
(Python's own help topics, `pydoc_data.topics`, as instruction records), side by side in one run:

- ``load``: a process that loads the model and θ_0 and scores nothing (the floor every variant stands on);
- ``before``: score_offline in a plain Python process, no checkpointing (the command's behaviour before both
  changes below);
- ``no_checkpoint``: `sqsd score --no-gradient-checkpointing` (the command fixes glibc's mmap threshold, so freed
  tensors go back to the system);
- ``default``: `sqsd score` (that, and each decoder layer checkpointed).

Each runs in its own process; its peak resident memory comes from the operating system (the children's
ru_maxrss), its time from the wall clock. Scores of every variant are compared with the first's.

    python benchmarks/offline_memory.py --directions sqsd_demo/directions
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = """
import resource, subprocess, sys, time
t = time.perf_counter()
code = subprocess.run(sys.argv[1:]).returncode
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t)
"""
"""Runs a command as its one child and prints its exit code, peak RSS (KiB on Linux) and wall seconds."""

LIBRARY = """
import json, sys
from sqsd_callback.offline import paper_passes, score_offline
from sqsd_lab import data
from sqsd_lab.adapters import folder_sets, theta_0
records, directions, out, max_length, max_tokens, score = sys.argv[1:7]
model, tokenizer = data.load_model(None)
theta_0(model, directions)
pairs = folder_sets(directions)
if score == "1":
    samples = data.tokenize_chats(tokenizer, data.load_records(records), int(max_length), skip_long=True)
    passes = paper_passes([p for p in pairs if p[1].kind == "danger"], [p for p in pairs if p[1].kind == "safety"])
    rows = score_offline(model, samples, passes, "cosine", 8, int(max_tokens))
    with open(out, "w") as f:
        f.writelines(json.dumps(r) + "\\n" for r in rows)
"""
"""score_offline in a plain process (``score`` 1), or only the model and θ_0 loaded (``score`` 0)."""


def records(tokenizer, n: int, low: int, high: int) -> list[dict]:
    """``n`` help topics whose chat-formatted length lies in [low, high] tokens, longest first."""
    from pydoc_data.topics import topics

    from sqsd_lab import data
    out = []
    for name, text in sorted(topics.items()):
        record = {"prompt": f"Explain Python's {name!r} topic in detail.", "response": text.strip(), "topic": name}
        length = len(data.tokenize_chats(tokenizer, [record], 10**6)[0]["input_ids"])
        if low <= length <= high:
            out.append((length, record))
    out.sort(key=lambda x: -x[0])
    return [dict(r, tokens=length) for length, r in out[:n]]


def measure(cmd: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, *cmd], capture_output=True, text=True, check=True)
    code, kib, seconds = proc.stdout.split()[-3:]
    if code != "0":
        raise RuntimeError(f"{cmd} failed: {proc.stderr[-2000:]}")
    return {"peak_rss_gib": int(kib) / 2**20, "wall_s": float(seconds)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--directions", required=True, help="a `sqsd directions` folder for the embedded model")
    p.add_argument("--records", type=int, default=10)
    p.add_argument("--min-tokens", type=int, default=500)
    p.add_argument("--max-tokens-record", type=int, default=1500, help="longest record, in tokens")
    p.add_argument("--max-tokens", type=int, default=8192, help="sqsd score's --max-tokens")
    p.add_argument("--out", default="benchmarks/results/offline-memory-cpu.json")
    opts = p.parse_args()
    from sqsd_lab import data
    rows = records(data.load_tokenizer(None), opts.records, opts.min_tokens, opts.max_tokens_record)
    tmp = Path(tempfile.mkdtemp())
    path = tmp / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    max_length = str(opts.max_tokens_record + 16)
    score = [sys.executable, "-m", "sqsd_lab.cli", "score", str(path), "--model", "embedded", "--directions",
             opts.directions, "--max-length", max_length, "--max-tokens", str(opts.max_tokens)]
    library = [sys.executable, "-c", LIBRARY, str(path), opts.directions, str(tmp / "before.jsonl"), max_length,
               str(opts.max_tokens)]
    variants = {"load": library + ["0"], "before": library + ["1"],
                "no_checkpoint": score + ["--out", str(tmp / "no_checkpoint"), "--no-gradient-checkpointing"],
                "default": score + ["--out", str(tmp / "default")]}
    env_note = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    result = {"machine": machine,
              "records": [{"topic": r["topic"], "tokens": r["tokens"]} for r in rows],
              "config": {**vars(opts), "MALLOC_MMAP_THRESHOLD_": env_note}, "variants": {}}
    for name, cmd in variants.items():
        t = time.perf_counter()
        result["variants"][name] = measure(cmd)
        print(f"{name:>14}: peak {result['variants'][name]['peak_rss_gib']:.2f} GiB, "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    reference = {r["index"]: r for r in map(json.loads, (tmp / "before.jsonl").read_text().splitlines())}
    for name in ("no_checkpoint", "default"):
        got = [json.loads(line) for line in (tmp / name / "scores.jsonl").read_text().splitlines()]
        result["variants"][name]["max_abs_sqsd_diff_vs_before"] = max(
            abs(r["sqsd"] - reference[r["index"]]["sqsd"]) for r in got)
    floor = result["variants"]["load"]["peak_rss_gib"]
    for v in result["variants"].values():
        v["above_load_gib"] = v["peak_rss_gib"] - floor
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2))
    print("\n| variant | peak RSS (GiB) | above the loaded model (GiB) | wall (s) |\n|---|---|---|---|")
    for name, v in result["variants"].items():
        print(f"| {name} | {v['peak_rss_gib']:.2f} | {v['above_load_gib']:.2f} | {v['wall_s']:.0f} |")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
