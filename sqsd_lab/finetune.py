"""One LoRA SFT helper for every training the project does (alignment, direction adapters, the demo's benign
fine-tuning), and loading or merging the adapters it saves."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from sqsd_callback.offline import load_adapter
from sqsd_callback.types import IGNORE_INDEX


def lora_config(rank: int = 8, alpha: float | None = None, targets: str | list[str] = "all-linear",
                dropout: float = 0.0) -> LoraConfig:
    """A causal-LM LoRA config (alpha defaults to 2·rank); direction adapters and the runs they score share it."""
    return LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets, lora_dropout=dropout,
                      task_type="CAUSAL_LM")


def check_training_samples(samples: Sequence[dict], who: str) -> None:
    """Refuse, before the Trainer starts, training samples it cannot train on: none at all (the Trainer's sampler
    would fail with "num_samples should be a positive integer value"), or none with a scored label."""
    if not samples:
        raise ValueError(f"{who} got an empty training set (0 examples), so there is nothing to train on (the "
                         f"Trainer would stop with torch's \"num_samples should be a positive integer value\"). "
                         f"Check the dataset file and any filtering before training (e.g. examples whose prompt "
                         f"is longer than max_length are skipped).")
    if not any(label != IGNORE_INDEX for s in samples for label in s["labels"][1:]):
        raise ValueError(f"{who}: the labels of all {len(samples)} training examples are all -100, so the loss is 0 "
                         f"and nothing would be trained. Check the collator / completion-only masking / the "
                         f"dataset's labels (-100 marks the prompt and padding only; a prompt truncated past "
                         f"max_length leaves no response token).")


def train_lora(model, tokenizer, samples: Sequence[dict], out_dir: str | Path, lora: LoraConfig | None = None,
               callbacks: Sequence = (), init_seed: int | None = None, **config) -> dict:
    """Train a fresh LoRA adapter with TRL's SFTTrainer on tokenized samples (labels −100 are not trained), save
    it to ``out_dir`` and take it off ``model`` again, so the model is left as found; returns a summary.

    The adapter's random A comes from ``init_seed`` (default: the training seed), never from whatever ran before
    in the process.

    ``config`` overrides SFTConfig fields (epochs, batch size, learning rate, bf16, ``report_to``, ...); the trainer's
    own files (and an SQSDCallback's ``sqsd/`` folder) go to ``out_dir`` too.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    check_training_samples(samples, "train_lora")
    cuda = torch.cuda.is_available()
    args = SFTConfig(output_dir=str(out_dir), **{
        "per_device_train_batch_size": 8, "learning_rate": 2e-4, "lr_scheduler_type": "constant", "logging_steps": 5,
        "save_strategy": "no", "report_to": "none", "gradient_checkpointing": False, "bf16": cuda,
        "use_cpu": not cuda, "max_length": None, "seed": 0, **config})
    dataset = Dataset.from_list([{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples])
    from transformers import set_seed
    init_seed = args.seed if init_seed is None else init_seed
    set_seed(init_seed)
    peft_model = get_peft_model(model, lora or lora_config())
    start = time.perf_counter()
    try:
        trainer = SFTTrainer(model=peft_model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=list(callbacks))
        trainer.train()
        peft_model.save_pretrained(str(out_dir))
    finally:
        peft_model.unload()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"examples": len(samples), "steps": trainer.state.global_step, "epochs": args.num_train_epochs,
            "seed": args.seed, "init_seed": init_seed,
            "learning_rate": args.learning_rate, "losses": losses, "seconds": round(time.perf_counter() - start, 1)}


def merge(model, name_or_path: str | Path):
    """Fold a saved LoRA adapter into ``model``'s weights (in place) and return it: θ_0 = base + aligned adapter."""
    return load_adapter(model, name_or_path).merge_and_unload()
