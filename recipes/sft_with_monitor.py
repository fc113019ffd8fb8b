"""LoRA SFT of your own chat model on your own data with SQSDCallback watching every example (GPU or CPU).

    python recipes/sft_with_monitor.py --model Qwen/Qwen3-8B --data dolly.jsonl \
        --danger beaver=dirs/danger --safety pku=dirs/safety --out runs/qwen3-dolly \
        --drop-zscore-above 3 --drop-zscore-robust --drop-min-history 8 --exclude-dropped

Every SQSDConfig option is an option here (`--help` lists them with their defaults), or comes from a YAML file
(`--sqsd-config sqsd.yaml`; options given on the command line win). The direction adapters are PEFT LoRA adapters of
the same base model with the same target modules (the paper's public ones, or `sqsd directions --model ... --out
dirs`). The run writes the adapter and `<out>/sqsd/` (scores.jsonl, drift.jsonl, report/) and prints the report's
path. Everything here is the package's own code; this file only wires it.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import torch

from sqsd_callback import SQSDCallback, SQSDConfig
from sqsd_lab.adapters import named_adapters
from sqsd_lab.data import load_model, load_records, tokenize_chats
from sqsd_lab.finetune import lora_config, train_lora
from sqsd_lab.paper_recipe import parse_target_modules
from sqsd_lab.report import write_report


def add_config_options(group) -> None:
    """One option per SQSDConfig field (``--drop-zscore-above``), its help and type taken from the dataclass."""
    for f in fields(SQSDConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            kind = (int if f.type.startswith("int") else float if f.type.startswith("float") else
                    _names if f.type.startswith("list") else str)
            group.add_argument(flag, type=kind, default=None, help=f"{f.metadata['help']} (default: {f.default})")


def _names(value: str) -> list[str]:
    """A comma-separated list option (``--mask-modules mlp.down_proj,mlp.up_proj``)."""
    return [part.strip() for part in value.split(",") if part.strip()]


def config_from(opts) -> SQSDConfig:
    """The YAML file's options, overridden by those given on the command line."""
    values = SQSDConfig.from_yaml(Path(opts.sqsd_config).read_text()).to_dict() if opts.sqsd_config else {}
    values.update({f.name: getattr(opts, f.name) for f in fields(SQSDConfig) if getattr(opts, f.name) is not None})
    return SQSDConfig.from_dict(values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="hub name or local path (default: the embedded SmolLM2)")
    p.add_argument("--data", required=True, help="prompt/response records: JSONL, CSV, datasets folder or hub")
    p.add_argument("--prompt-field", default=None, help="the prompt's field (None: found from the format: "
                   "prompt/response, prompt/completion, messages, Alpaca or Dolly)")
    p.add_argument("--response-field", default=None, help="the response's field (with --prompt-field)")
    p.add_argument("--danger", action="append", default=[], metavar="[NAME=]ADAPTER")
    p.add_argument("--safety", action="append", default=[], metavar="[NAME=]ADAPTER")
    p.add_argument("--out", required=True)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (the direction sets' rank need not match)")
    p.add_argument("--target-modules", default="all-linear", help="LoRA target modules, comma-separated, or "
                   "all-linear; the direction sets must cover them (`sqsd directions --target-modules`)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--sqsd-config", default=None, help="a YAML file of SQSDConfig options")
    p.add_argument("--mask-data", default=None, help="safety records (prompt/response, as --data) for the WaRP "
                   "safety mask (SQSDCallback(mask=...); its options are --mask-*)")
    add_config_options(p.add_argument_group("SQSDCallback options (SQSDConfig)"))
    p.add_argument("--report-to", default="none", help="wandb, tensorboard, ... (the Trainer's report_to)")
    opts = p.parse_args()

    model, tokenizer = load_model(opts.model)  # on the GPU in bf16 where there is one
    samples = tokenize_chats(tokenizer, load_records(opts.data, opts.prompt_field, opts.response_field),
                             opts.max_length)
    config = config_from(opts)
    mask = None if opts.mask_data is None else tokenize_chats(tokenizer, load_records(opts.mask_data), opts.max_length)
    callback = SQSDCallback(danger=[s for _, s in named_adapters(opts.danger, "danger")],
                            safety=[s for _, s in named_adapters(opts.safety, "safety")], config=config, mask=mask)
    lora = lora_config(opts.rank, targets=parse_target_modules(opts.target_modules))
    summary = train_lora(model, tokenizer, samples, opts.out, lora=lora, callbacks=[callback],
                         num_train_epochs=opts.epochs, learning_rate=opts.lr,
                         per_device_train_batch_size=opts.batch_size, gradient_accumulation_steps=opts.grad_accum,
                         gradient_checkpointing=torch.cuda.is_available(), report_to=opts.report_to, logging_steps=10)
    print(f"trained {summary['steps']} steps in {summary['seconds']} s; report: {write_report(opts.out)}")


if __name__ == "__main__":
    main()
