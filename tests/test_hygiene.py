"""Importing the package changes nothing global, and figures are never registered with pyplot (a long run's
dashboards keep memory flat)."""

import subprocess
import sys

import pytest

from sqsd_lab import plots


@pytest.mark.slow
def test_importing_every_module_leaves_the_matplotlib_backend_alone():
    code = ("import matplotlib; matplotlib.use('pdf'); import sqsd_callback, sqsd_lab.plots, "
            "sqsd_callback.offline, sqsd_lab.windows, sqsd_lab.report, sqsd_lab.protect, "
            "sqsd_lab.cli; print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().lower() == "pdf"


@pytest.mark.slow
def test_figures_are_not_kept_by_pyplot():
    from matplotlib._pylab_helpers import Gcf
    rows = [{"step": s, "drift": 0.1 * s, "drift_danger": 0.2 * s, "drift_safety": 0.1 * s,
             "layers": {f"m{i}": {"cosine": [0.1 * i, -0.1], "projection": [0.0, 0.0]} for i in range(4)}}
            for s in range(1, 4)]
    before = Gcf.get_num_fig_managers()
    for _ in range(20):  # what a wandb run with wandb_every=1 does at every logging step
        plots.layer_heatmap(rows, {"danger/d": "danger", "safety/s": "safety"}).savefig(__import__("io").BytesIO())
        plots.drift_curve(rows)
    assert Gcf.get_num_fig_managers() == before


@pytest.mark.slow
def test_the_callback_imports_without_the_app_libraries():
    code = ("import sys; from sqsd_callback import SQSDCallback, SQSDConfig, DirectionSet, score_samples; "
            "print(sorted(m for m in ('matplotlib', 'trl', 'datasets', 'wandb', 'gguf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_wandb_heatmap_refreshes_keep_memory_flat():
    """What WandbSink does at every due logging step (heatmap → PNG for wandb), 60 times after a warm-up: no
    Figure stays alive and resident memory grows by less than 30 MB (an unclosed figure per refresh cost 1–6 MB)."""
    import contextlib
    import ctypes
    import gc
    import os

    from matplotlib.figure import Figure

    from sqsd_callback.sinks.wandb import _png

    def rss_mb():  # after handing freed heap back to the OS: fragmentation from other tests is not a leak
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    rows = [{"step": s, "drift": 0.1 * s, "drift_danger": 0.2 * s, "drift_safety": 0.1 * s,
             "layers": {f"m{i}": {"cosine": [0.1 * i, -0.1], "projection": [0.0, 0.0]} for i in range(60)}}
            for s in range(1, 200)]
    kinds = {"danger/d": "danger", "safety/s": "safety"}
    for _ in range(5):
        _png(plots.layer_heatmap(rows, kinds))
    gc.collect()
    before = rss_mb()
    for _ in range(60):
        _png(plots.layer_heatmap(rows, kinds))
    gc.collect()
    assert sum(isinstance(o, Figure) for o in gc.get_objects()) == 0
    assert rss_mb() - before < 30


@pytest.mark.slow
def test_a_heatmap_refresh_late_in_a_long_run_takes_no_more_memory_than_an_early_one(tmp_path):
    """The refresh reads drift.jsonl, which grows by a row per step; the old code held every row's per-module dicts
    at once (peak 70, 137, 273 MiB at 500, 1,000, 2,000 steps of 210 modules). Now rows stream into at most 400
    columns: the peak at 3,000 steps is within 2 MiB of the one at 1,000. Checked against the grid made directly."""
    import json
    import tracemalloc

    from sqsd_callback.sinks import iter_jsonl

    kinds = {"danger/d": "danger", "safety/s": "safety"}
    row = lambda s: {"step": s, "layers": {f"m{i}": {"cosine": [0.001 * s * i, -0.001 * s], "projection": [0, 0]}  # noqa: E731
                                           for i in range(60)}}
    path, peaks, done = tmp_path / "drift.jsonl", {}, 0
    for steps in (1000, 3000):
        with open(path, "a") as f:
            f.writelines(json.dumps(row(s)) + "\n" for s in range(done + 1, steps + 1))
        done = steps
        tracemalloc.start()
        fig = plots.layer_heatmap(iter_jsonl(path), kinds)
        peaks[steps] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    assert peaks[3000] - peaks[1000] < 2, peaks
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (60, 375)  # 3,000 steps, 8 to a column
    want = [sum(0.001 * s * i + 0.001 * s for s in range(1 + 8 * c, 9 + 8 * c)) / 8 for i in (0, 59) for c in (0, 374)]
    got = [float(image[i, c]) for i in (0, 59) for c in (0, 374)]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-9
