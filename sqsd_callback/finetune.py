"""One LoRA SFT helper for every training the project does (alignment, direction adapters, the demo's benign
fine-tuning), and loading or merging the adapters it saves."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # the second: PEFT's legacy format

def lora_config(rank: int = 8, alpha: float | None = None, targets: str | list[str] = "all-linear",
                dropout: float = 0.0) -> LoraConfig:
    """A causal-LM LoRA config (alpha defaults to 2·rank); direction adapters and the runs they score share it."""
    return LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets, lora_dropout=dropout,
                      task_type="CAUSAL_LM")


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

    if not samples:
        raise ValueError("train_lora got no training samples")
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


def adapter_dir(ref: str | Path, subfolder: str | None = None, revision: str | None = None, token=None,
                cache_dir: str | Path | None = None) -> Path:
    """A PEFT adapter's local folder: a local path, or a Hub repository ``org/name`` (also written
    ``org/name@revision:sub/folder``) fetched through huggingface_hub (its cache and offline mode, the user's token),
    then ``subfolder``. The folder must hold adapter_config.json and adapter_model.safetensors (or legacy .bin)."""
    text = str(ref)
    path = Path(text).expanduser()
    if not path.exists() and not text.startswith((".", "/", "~")):
        repo, _, sub = text.partition(":")
        repo, _, rev = repo.partition("@")
        if repo.count("/") == 1:
            subfolder, revision = subfolder or sub or None, revision or rev or None
            from huggingface_hub import snapshot_download
            patterns = [f"{subfolder}/adapter_*", f"{subfolder}/*.json"] if subfolder else ["adapter_*", "*.json"]
            try:
                path = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, token=token,
                                              cache_dir=cache_dir))
            except Exception as err:  # hub errors vary (offline, missing repo, auth); name what was tried
                raise FileNotFoundError(f"adapter {text!r} is neither a local folder nor a Hub repository that could "
                                        f"be fetched (revision {revision or 'main'}): {err}. Offline, the repository "
                                        f"must be in the Hugging Face cache already.") from err
    if subfolder:
        path = path / subfolder
    missing = [ADAPTER_CONFIG] if not (path / ADAPTER_CONFIG).is_file() else []
    if not any((path / w).is_file() for w in ADAPTER_WEIGHTS):
        missing.append(ADAPTER_WEIGHTS[0])
    if missing:
        raise FileNotFoundError(f"{path} is not a PEFT adapter: {', '.join(missing)} missing (PEFT's legacy "
                                f"{ADAPTER_WEIGHTS[1]} is read too; save one with `model.save_pretrained(dir)` on a "
                                f"PEFT model{'; check the subfolder' if subfolder else ''}).")
    return path


def load_adapter(model, name_or_path: str | Path, scaling: float | None = None):
    """``model`` with a saved LoRA adapter on top (a PeftModel; ``.unload()`` takes it off); ``scaling`` replaces the
    adapter's own alpha/r factor, as the paper loads θ_0 + α·V_safety."""
    path = adapter_dir(name_or_path)
    try:
        peft_model = PeftModel.from_pretrained(model, str(path))
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"adapter {path} does not fit the model ({type(model).__name__}, "
                         f"{getattr(model.config, 'name_or_path', '')}): {err}") from err
    if scaling is not None:
        for module in peft_model.modules():
            if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
                module.scaling["default"] = scaling
    return peft_model


def merge(model, name_or_path: str | Path):
    """Fold a saved LoRA adapter into ``model``'s weights (in place) and return it: θ_0 = base + aligned adapter."""
    return load_adapter(model, name_or_path).merge_and_unload()
