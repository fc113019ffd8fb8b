"""LoRA SFT of your own chat model on your own data with SQSDCallback watching every example (GPU or CPU).

    python recipes/sft_with_monitor.py --model Qwen/Qwen3-8B --data dolly.jsonl \
        --danger beaver=path/to/danger_adapter --safety pku=path/to/safety_adapter \
        --out runs/qwen3-dolly --drop-above 0.5 --stop-drift-above 0.2

The direction adapters are PEFT LoRA adapters of the same base model (the paper's public ones, or `sqsd
directions --model ... --out dirs`). The run writes the adapter and `<out>/sqsd/` (scores.jsonl, drift.jsonl,
report/) and prints the report's path. Everything here is the package's own code; this file only wires it.
"""

from __future__ import annotations

import argparse

import torch

from sqsd_callback import SQSDCallback
from sqsd_lab.adapters import named_adapters
from sqsd_lab.data import load_model, load_records, tokenize_chats
from sqsd_lab.finetune import lora_config, train_lora
from sqsd_lab.report import write_report


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
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--metric", default="cosine", choices=("cosine", "projection", "global_cosine"))
    p.add_argument("--drop-above", type=float, default=None, help="drop examples whose SQSD exceeds this")
    p.add_argument("--stop-drift-above", type=float, default=None, help="stop when the run's drift exceeds this")
    p.add_argument("--report-to", default="none", help="wandb, tensorboard, ... (the Trainer's report_to)")
    opts = p.parse_args()

    model, tokenizer = load_model(opts.model)  # on the GPU in bf16 where there is one
    samples = tokenize_chats(tokenizer, load_records(opts.data, opts.prompt_field, opts.response_field),
                             opts.max_length)
    callback = SQSDCallback(danger=[s for _, s in named_adapters(opts.danger, "danger")],
                            safety=[s for _, s in named_adapters(opts.safety, "safety")],
                            metric=opts.metric, drop_above=opts.drop_above, stop_drift_above=opts.stop_drift_above,
                            save_last_safe=opts.stop_drift_above is not None)
    summary = train_lora(model, tokenizer, samples, opts.out, lora=lora_config(opts.rank), callbacks=[callback],
                         num_train_epochs=opts.epochs, learning_rate=opts.lr,
                         per_device_train_batch_size=opts.batch_size, gradient_accumulation_steps=opts.grad_accum,
                         gradient_checkpointing=torch.cuda.is_available(), report_to=opts.report_to, logging_steps=10)
    print(f"trained {summary['steps']} steps in {summary['seconds']} s; report: {write_report(opts.out)}")


if __name__ == "__main__":
    main()
