"""The evidence experiment of issue 27: poison kinds × shares × conditions × seeds on the embedded default, each run
cached under --cache by its key, then the machine-readable summary.

    python recipes/evidence.py --quick --cache runs/evidence-quick       # 2 CPU cores
    python recipes/evidence.py --full --cache runs/evidence               # issue 27's sizes (a GPU, or many hours)
    python recipes/evidence.py --full --cache runs/evidence --only drops,clean --seeds 0 1

A rerun reads every finished run from the cache and runs only the rest; the summary is rewritten after each run.
Then every poisoned pool of the plan is screened before training (sqsd_lab.evidence.screen: what each filter and
SQSD's offline score would remove), its per-record scores cached under --cache too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm.auto import tqdm

from sqsd_lab.evidence import report
from sqsd_lab.evidence.files import write_atomic
from sqsd_lab.evidence.judges import add_judge_arguments, judge_from_args
from sqsd_lab.evidence.protocol import Run, Runner, embedded_lab, plan, poisoned_pools, write_summary
from sqsd_lab.evidence.screen import cached_results, screen


def estimate(pending: list[Run], measured: dict) -> tuple[float, float]:
    """(tokens/s, seconds left): the first executed run's trained tokens per wall second (evaluation included),
    applied to each pending run's pool × epochs at that run's tokens per example."""
    info, s = measured["train"], measured["settings"]
    rate = info["tokens"] / measured["seconds"]
    per_example = info["tokens"] / (info["examples"] * s["epochs"])
    return rate, sum(r.settings.pool * r.settings.epochs * per_example / rate for r in pending)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="tiny plan for 2 CPU cores")
    mode.add_argument("--full", action="store_true", help="issue 27's sizes")
    p.add_argument("--cache", required=True, help="folder of cached runs (<cache>/<key>/result.json)")
    p.add_argument("--demo-cache", default="sqsd_demo", help="sqsd demo's cache (directions, θ_0)")
    p.add_argument("--only", default="", help="comma-separated conditions to run (and what they need)")
    p.add_argument("--seeds", type=int, nargs="+", help="reported seeds (default: the plan's)")
    p.add_argument("--summary", help="where the summary goes (default: benchmarks/results/evidence-summary.json, "
                   "evidence-quick-summary.json with --quick); every run's result, per-prompt outcomes included, "
                   "goes next to it as <name>-runs.json, the tables as <name>.md and the figure as <name>.png")
    p.add_argument("--cached-only", action="store_true", help="run nothing: write the summary, tables and figures of "
                   "the plan's runs and pool screening already in --cache (no model is loaded)")
    add_judge_arguments(p)
    opts = p.parse_args()
    summary = Path(opts.summary or f"benchmarks/results/evidence{'-quick' if opts.quick else ''}-summary.json")
    only = [c.strip() for c in opts.only.split(",") if c.strip()] or None
    runs = plan("quick" if opts.quick else "full", opts.seeds, only)
    cache = Path(opts.cache)
    settings, pools = runs[0].settings, poisoned_pools(runs)
    if opts.cached_only:
        runner = Runner(None, cache)
        results = [runner.result(r) for r in runs if runner.done(r)]
        print(f"{len(results)} of the plan's {len(runs)} runs are cached")
        publish(results, summary, cached_results(cache, settings, pools))
        print(f"summary: {summary}")
        return
    lab = embedded_lab(opts.demo_cache, cache / "inputs", judge_from_args(opts))
    runner = Runner(lab, cache)
    todo = [r for r in runs if not runner.done(r)]
    print(f"{len(runs)} runs in the plan, {len(runs) - len(todo)} cached, {len(todo)} to run")
    results, timed, screened = [], False, cached_results(cache, settings, pools)  # screening follows the runs
    for run in tqdm(runs, desc="evidence runs", unit="run"):
        start, cached = time.perf_counter(), runner.done(run)
        results.append(runner.result(run))
        if not cached and not timed and "train" in results[-1]:
            pending = [r for r in runs if not runner.done(r)]
            rate, left = estimate(pending, results[-1])
            tqdm.write(f"{rate:.0f} tokens/s over a run (training and evaluation, "
                       f"{time.perf_counter() - start:.0f} s): about {left / 3600:.1f} h for the {len(pending)} left")
            timed = True
        publish(results, summary, screened)
    screening = screen(lab, {at: lab.pool(*at, settings) for at in pools}, settings, cache)
    publish(results, summary, screening)
    print(f"summary: {summary}")


def publish(results: list[dict], summary: Path, screening: list[dict] | None = None) -> None:
    """The summary (JSON), every run's result beside it (<name>-runs.json, with the pools' screening), the tables
    (.md) and the figures (.png, and <name>-screening.png where the pools were screened)."""
    written = write_summary(results, summary, screening)
    write_atomic(summary.with_name(f"{summary.stem}-runs.json"),
                 {"runs": results, **({"screening": screening} if screening else {})})
    summary.with_suffix(".md").write_text(report.table(written), encoding="utf-8")
    report.figure(written).savefig(summary.with_suffix(".png"), dpi=120)
    plot, path = report.screening_figure(written), summary.with_name(f"{summary.stem}-screening.png")
    if plot is not None:
        plot.savefig(path, dpi=120)
    else:  # no screening (yet): no figure of an older one beside these tables
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
