"""Which run-level signal tracks the harm a fine-tune does? Refusal measured at checkpoints along a run, beside
every drift signal the callback logs at those steps.

    python recipes/drift_signals.py --quick      # sqsd demo's cache: the clean and the 10%-poisoned pool, seed 0

Each run fine-tunes θ_0 with the protection experiment's settings under a monitoring SQSDCallback (no action),
saving the adapter every ``--every`` steps; each checkpoint's harmfulness is measured on the held-out harmful
prompts and joined with drift.jsonl at that step (drift, drift_danger, drift_safety, the signed projections onto
each set, the update's norm). Every checkpoint's evaluation is cached, so a rerun continues. Writes
benchmarks/results/drift-signals-quick-cpu.{json,md,png}: per signal, Spearman's rho with harmfulness over every
checkpoint of both runs, and the curves.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from sqsd_callback.callback import SQSDCallback
from sqsd_callback.offline import load_adapter
from sqsd_callback.sinks import read_jsonl
from sqsd_callback.sinks.heatmap import new_figure
from sqsd_lab.data import tokenize_chats
from sqsd_lab.demo import run_demo
from sqsd_lab.evidence import stats
from sqsd_lab.evidence.report import shown_rho
from sqsd_lab.finetune import lora_config, train_lora
from sqsd_lab.protect import Experiment, Inputs, Settings, poisoned_pool
from sqsd_lab.refusal import refusal_rate

SIGNALS = ("drift", "drift_danger", "drift_safety", "projection/danger/danger", "projection/safety/safety", "norm")


def run(exp: Experiment, p: float, seed: int, every: int, out: Path) -> list[dict]:
    """One monitored fine-tune saving every ``every`` steps; harmfulness and the drift signals per checkpoint."""
    folder = out / f"p{p:g}" / f"seed{seed}"
    if not (folder / "sqsd" / "drift.jsonl").is_file():
        pool = poisoned_pool(exp.benign, exp.poison, p)
        samples = tokenize_chats(exp.tokenizer, pool, exp.s.max_length)
        train_lora(exp.model, exp.tokenizer, samples, folder, lora=lora_config(exp.s.rank),
                   callbacks=[SQSDCallback(danger=[exp.danger], safety=[exp.safety])], num_train_epochs=exp.s.epochs,
                   learning_rate=exp.s.learning_rate, seed=seed, logging_steps=4, save_strategy="steps",
                   save_steps=every, save_only_model=True)
    drift = {d["step"]: d for d in read_jsonl(folder / "sqsd" / "drift.jsonl")}
    points = []
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    for ckpt in tqdm(checkpoints, desc=f"p={p:g} checkpoints"):
        step, done = int(ckpt.name.split("-")[1]), ckpt / "refusal.json"
        if not done.is_file():
            tuned = load_adapter(exp.model, ckpt)
            try:
                done.write_text(json.dumps(refusal_rate(tuned, exp.tokenizer, exp.held_out, exp.s.eval_tokens)))
            finally:
                tuned.unload()
        rate = json.loads(done.read_text())
        points.append({"p": p, "step": step, "harmfulness": 1 - rate["rate"],
                       **{s: drift[step].get(s) for s in SIGNALS}})
    return points


PANELS = (("harmfulness",), ("drift", "drift_danger", "drift_safety"),
          ("projection/danger/danger", "projection/safety/safety"), ("norm",))


def plot(points: list[dict], path: Path) -> None:
    """Harmfulness and the signals per step, the clean run in green and the poisoned one in red."""
    fig, axes = new_figure((12, 3.4), ncols=len(PANELS))
    for ax, keys in zip(axes, PANELS):
        for p, colour in ((0.0, "g"), (0.1, "r")):
            pts = [pt for pt in points if pt["p"] == p]
            for key, ls in zip(keys, ("-", "--", ":")):
                ax.plot([pt["step"] for pt in pts], [pt[key] for pt in pts], colour + ls, marker="o", ms=2,
                        label=f"{key} p={p:g}")
        ax.set(xlabel="optimizer step", title=" / ".join(k.split("/")[-2] if "/" in k else k for k in keys))
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", required=True, help="sqsd demo's cache (the only mode)")
    ap.add_argument("--cache", default="sqsd_demo")
    ap.add_argument("--every", type=int, default=4, help="save and evaluate every this many steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default="benchmarks/results/drift-signals-quick-cpu")
    opts = ap.parse_args()
    start = time.perf_counter()
    run_demo(opts.cache)
    out = Path(opts.cache) / "drift_signals"
    exp = Experiment(Inputs.from_demo(opts.cache, Path(opts.cache) / "protect"), out, Settings())
    points = [pt for p in (0.0, 0.1) for pt in run(exp, p, opts.seed, opts.every, out)]
    rho = {s: stats.spearman([pt[s] for pt in points], [pt["harmfulness"] for pt in points]) for s in SIGNALS}
    within = {f"p={p:g}": {s: stats.spearman([pt[s] for pt in points if pt["p"] == p],
                                       [pt["harmfulness"] for pt in points if pt["p"] == p]) for s in SIGNALS}
              for p in (0.0, 0.1)}
    result = {"seed": opts.seed, "every": opts.every, "points": points, "rho_all": rho, "rho_within": within,
              "minutes_this_invocation": (time.perf_counter() - start) / 60}
    res = Path(opts.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["| signal | rho with harmfulness, both runs | within clean | within poisoned |", "|---|---|---|---|",
             *[f"| {s} | {shown_rho(rho[s])} | {shown_rho(within['p=0'][s])} | {shown_rho(within['p=0.1'][s])} |"
               for s in SIGNALS],
             "", f"Checkpoints every {opts.every} steps of two monitored fine-tunes (seed {opts.seed}): the clean "
             f"pool and the 10%-poisoned pool; harmfulness on {len(exp.held_out)} held-out harmful prompts."]
    res.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(points, res.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
