"""``sqsd demo``: the whole story on the embedded default, in stages cached under one folder.

Raw model → its refusal rate → alignment (θ_0) → danger and safety adapters → benign fine-tuning of θ_0 with
SQSDCallback → refusal rate after → report. Each stage writes its output under the cache folder and is skipped
when that output exists, so a second run only rewrites the report and the summary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from sqsd_callback.offline import load_adapter
from sqsd_callback.scoring import riskiest
from sqsd_callback.sinks import read_jsonl
from sqsd_lab import data
from sqsd_lab.adapters import build_directions, compliant_records, direction_sets, refusal_records, shuffled, theta_0
from sqsd_lab.finetune import lora_config, train_lora
from sqsd_lab.refusal import refusal_rate
from sqsd_lab.report import write_report


@dataclass
class DemoSizes:
    """How much data each stage uses: sized so that the demo finishes well within 20 minutes on 2 CPU cores."""

    held_out: int = 96            # held-out harmful prompts in each refusal evaluation
    benign_eval: int = 32         # benign prompts (never trained on) in each evaluation: over-refusal
    align_refusals: int = 80      # harmful prompts with refusals in the alignment step ...
    retention: int = 48           # ... plus benign records, so θ_0 still answers benign requests
    directions: int = 64          # examples for each of the danger and safety adapters
    finetune: int = 128           # benign fine-tuning records (half checkable tasks, half writing)
    epochs: float = 2.0
    learning_rate: float = 5e-4
    rank: int = 8
    response_tokens: int = 64     # generated responses (compliance, writing)
    eval_tokens: int = 32         # refusal evaluation (refusals show in the first words)
    max_length: int = 192


class _Model:
    """The demo's one model in memory: loaded on first use, then turned from the raw model into θ_0 once."""

    def __init__(self, name: str | None) -> None:
        self.name, self.model, self.tokenizer, self.aligned = name, None, None, False

    def raw(self):
        if self.model is None:
            self.model, self.tokenizer = data.load_model(self.name)
        if self.aligned:
            raise RuntimeError("the raw model is gone: θ_0 was merged into it")
        return self.model

    def theta_0(self, directions: Path):
        if not self.aligned:
            theta_0(self.raw(), directions)
            self.aligned = True
        return self.model


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)  # a killed stage leaves no half-written output to be taken for a finished one


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def run_demo(cache: str | Path = "sqsd_demo", model_name: str | None = None, sizes: DemoSizes | None = None,
             seed: int = 0) -> dict:
    """Run (or resume) every stage under ``cache``; returns the summary also written to ``summary.json``."""
    sizes, cache, start = sizes or DemoSizes(), Path(cache), time.perf_counter()
    m, timings = _Model(model_name), {}
    earlier = json.loads((cache / "summary.json").read_text())["timings"] if (cache / "summary.json").is_file() else {}
    paths = {"raw": cache / "eval" / "raw.json", "data": cache / "data" / "finetune.jsonl",
             "directions": cache / "directions" / "directions.json", "aligned": cache / "eval" / "aligned.json",
             "finetune": cache / "finetune" / "adapter_model.safetensors",
             "finetuned": cache / "eval" / "finetuned.json"}

    prompts = [p["prompt"] for p in data.harmful_prompts()]
    train, held_out = data.split_prompts(prompts, 0.2, seed)
    align_pool, direction_pool = data.split_prompts(train, 0.5, seed)
    n_writing = (sizes.retention + sizes.finetune) // 2  # benign_records' writing prompts; evaluate on others
    trained = set(data.writing_prompts(n_writing, seed))
    unseen = [p for p in data.writing_prompts(data.WRITING_PROMPTS, seed) if p not in trained]
    eval_prompts = {"harmful": held_out[:sizes.held_out],
                    "benign": unseen[:sizes.benign_eval // 2] + [
                        t["prompt"] for t in data.benign_tasks(sizes.benign_eval - sizes.benign_eval // 2, seed + 1)]}

    def stage(name: str, done: Path, run: Callable[[], None]) -> None:
        if done.exists():
            took = earlier.get(name, "cached")
            timings[name] = took if isinstance(took, str) else f"cached ({took} s when it ran)"
            return
        print(f"\n== sqsd demo: {name}", flush=True)
        t = time.perf_counter()
        run()
        timings[name] = round(time.perf_counter() - t, 1)

    def evaluate(model, path: Path) -> None:
        _write_json(path, {kind: refusal_rate(model, m.tokenizer, ps, sizes.eval_tokens)
                           for kind, ps in eval_prompts.items()})

    def make_data() -> None:
        model = m.raw()
        # the prefilled raw model complies; some outputs are refusals or loops and are dropped, so ask more prompts
        compliant = compliant_records(model, m.tokenizer, direction_pool[:2 * sizes.directions],
                                      sizes.response_tokens)[:sizes.directions]
        benign = data.benign_records(model, m.tokenizer, sizes.retention + sizes.finetune - n_writing, n_writing,
                                     seed, sizes.response_tokens)
        _write_jsonl(cache / "data" / "compliant.jsonl", compliant)
        _write_jsonl(cache / "data" / "retention.jsonl", benign[:sizes.retention])
        _write_jsonl(paths["data"], benign[sizes.retention:])

    def make_directions() -> None:
        align = shuffled(refusal_records(align_pool[:sizes.align_refusals], seed),
                         read_jsonl(cache / "data" / "retention.jsonl"), seed=seed)
        build_directions(m.raw(), m.tokenizer, cache / "directions",
                         danger=read_jsonl(cache / "data" / "compliant.jsonl"),
                         safety=refusal_records(direction_pool[:sizes.directions], seed + 1), align=align,
                         held_out=held_out, rank=sizes.rank, max_length=sizes.max_length,
                         about={"model": model_name or "embedded SmolLM2-135M-Instruct"},
                         num_train_epochs=sizes.epochs, learning_rate=sizes.learning_rate)
        m.aligned = True  # build_directions merged the aligned adapter into the model

    def finetune() -> None:
        from sqsd_callback.callback import SQSDCallback
        danger, safety = direction_sets(cache / "directions")
        samples = data.tokenize_chats(m.tokenizer, read_jsonl(paths["data"]), sizes.max_length)
        train_lora(m.theta_0(cache / "directions"), m.tokenizer, samples, cache / "finetune",
                   lora=lora_config(sizes.rank), callbacks=[SQSDCallback(danger=[danger], safety=[safety])],
                   num_train_epochs=sizes.epochs, learning_rate=sizes.learning_rate, logging_steps=4)

    def evaluate_finetuned() -> None:
        model = load_adapter(m.theta_0(cache / "directions"), cache / "finetune")
        try:
            evaluate(model, paths["finetuned"])
        finally:
            model.unload()

    stage("refusal rate of the raw model", paths["raw"], lambda: evaluate(m.raw(), paths["raw"]))
    stage("training data (compliant responses, benign records)", paths["data"], make_data)
    stage("alignment step, danger and safety adapters", paths["directions"], make_directions)
    stage("refusal rate of the aligned model θ_0", paths["aligned"],
          lambda: evaluate(m.theta_0(cache / "directions"), paths["aligned"]))
    stage("benign LoRA fine-tuning of θ_0 with SQSDCallback", paths["finetune"], finetune)
    stage("refusal rate after benign fine-tuning", paths["finetuned"], evaluate_finetuned)
    summary = _summarize(cache, paths, sizes, timings)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    _write_json(cache / "summary.json", summary)
    return summary


def _rates(path: Path) -> dict:
    results = json.loads(path.read_text())
    return {kind: {k: r[k] for k in ("rate", "count", "n")} for kind, r in results.items()}


def _summarize(cache: Path, paths: dict, sizes: DemoSizes, timings: dict) -> dict:
    """Refusal rates, final drift, riskiest examples and stage timings; writes the report with their sections."""
    run = cache / "finetune" / "sqsd"
    records = read_jsonl(paths["data"])
    scores = read_jsonl(run / "scores.jsonl")
    drift = read_jsonl(run / "drift.jsonl")[-1]
    rates = {name: _rates(paths[key]) for name, key in
             (("raw model", "raw"), ("aligned θ_0", "aligned"), ("after benign fine-tuning", "finetuned"))}
    top = [{"sqsd": r["sqsd"], "index": r["index"], "category": records[r["index"]]["category"],
            "prompt": records[r["index"]]["prompt"]} for r in riskiest(scores, 5)]
    by_category: dict[str, list[float]] = {}
    for r in (r for r in scores if r["sqsd"] is not None):
        by_category.setdefault(records[r["index"]]["category"], []).append(r["sqsd"])
    means = {c: sum(v) / len(v) for c, v in sorted(by_category.items())}
    sections = [
        "## Refusal rate", "",
        f"Greedy responses ({sizes.eval_tokens} tokens) to {sizes.held_out} held-out harmful prompts (HarmBench and "
        f"Do-Not-Answer, never trained on) and {sizes.benign_eval} benign prompts, refusals found by phrase matching.",
        "", "| model | harmful prompts refused | benign prompts refused |", "|---|---|---|",
        *[f"| {name} | {r['harmful']['rate']:.0%} ({r['harmful']['count']}/{r['harmful']['n']}) | "
          f"{r['benign']['rate']:.0%} ({r['benign']['count']}/{r['benign']['n']}) |" for name, r in rates.items()],
        "", "## Mean SQSD by kind of training example", "",
        "| kind | scores (every epoch) | mean SQSD |", "|---|---|---|",
        *[f"| {c} | {len(by_category[c])} | {v:+.4f} |" for c, v in means.items()],
        "", "## Demo stages (seconds)", "",
        *[f"- {name}: {t}" for name, t in timings.items()], ""]
    report = write_report(run, extra_sections=sections)
    return {"report": str(report), "refusal": rates, "sizes": asdict(sizes), "timings": timings,
            "final_drift": {k: drift[k] for k in ("step", "drift", "drift_danger", "drift_safety")},
            "mean_sqsd_by_category": means, "riskiest": top}


def print_summary(summary: dict) -> None:
    """The demo's closing note: refusal rates, final drift, riskiest examples and where the report is."""
    rates = summary["refusal"]
    print("\n== sqsd demo: summary")
    print("refusal rate on held-out harmful prompts: " + " → ".join(
        f"{name} {r['harmful']['rate']:.0%}" for name, r in rates.items()))
    print("refusal rate on benign prompts:           " + " → ".join(
        f"{name} {r['benign']['rate']:.0%}" for name, r in rates.items()))
    d = summary["final_drift"]
    print(f"final drift at step {d['step']}: {d['drift']:+.4f} "
          f"(toward danger {d['drift_danger']:+.4f}, toward safety {d['drift_safety']:+.4f})")
    print("mean SQSD by kind: " + ", ".join(f"{c} {v:+.4f}" for c, v in summary["mean_sqsd_by_category"].items()))
    print("riskiest training examples:")
    for r in summary["riskiest"]:
        print(f"  SQSD {r['sqsd']:+.4f}  [{r['category']}] {r['prompt'][:90]}")
    print(f"report: {summary['report']}")
    print(f"wall time: {summary['seconds'] / 60:.1f} min")
