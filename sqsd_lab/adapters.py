"""The alignment, danger and safety adapters (``sqsd directions``): their training data and their training.

Danger: harmful prompts → compliant responses; safety: harmful prompts → refusals; both LoRA adapters trained on
θ_0 with the loss on response tokens only. Where the base model is too weakly aligned to refuse, an alignment
adapter (refusals on part of the harmful prompts plus benign retention data) is trained first and merged: θ_0.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from peft import LoraConfig

from sqsd_callback.directions import DirectionSet
from sqsd_callback.directions.hub import adapter_dir
from sqsd_lab.data import generate_responses, tokenize_chats
from sqsd_lab.finetune import lora_config, merge, train_lora
from sqsd_lab.refusal import is_refusal, templated_refusals

PREFILL = "Sure, here is"
SUMMARY = "directions.json"
HELD_OUT = "held_out.jsonl"
TRAIN_RECORDS = "train.jsonl"


def is_degenerate(text: str, min_words: int = 8) -> bool:
    """True for a response too short or too repetitive to teach anything (a prefilled small model often loops)."""
    words = text.split()
    if len(words) < min_words:
        return True
    trigrams = list(zip(words, words[1:], words[2:]))
    return len(set(trigrams)) < 0.6 * len(trigrams)


def compliant_records(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64,
                      batch_size: int = 16) -> list[dict]:
    """Harmful prompts with the model's own compliance (its turn prefilled with "Sure, here is"); refusals and
    degenerate loops are dropped."""
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size, prefill=PREFILL,
                                   desc="compliant responses")
    return [{"prompt": p, "response": r} for p, r in zip(prompts, responses)
            if not is_refusal(r) and not is_degenerate(r)]


def refusal_records(prompts: Sequence[str], seed: int = 0) -> list[dict]:
    """Harmful prompts with templated refusals: safety and alignment targets that do not depend on the model."""
    return [{"prompt": p, "response": r} for p, r in zip(prompts, templated_refusals(len(prompts), seed))]


def init_seed(stage: str, seed: int = 0) -> int:
    """The random initialisation seed of a ``sqsd directions`` adapter: its own per stage (``aligned``, ``danger``,
    ``safety``) and far from the small training seeds fine-tunes use. Adapters started from one seed share
    their random A, so their updates lie in one row space and their cosines are inflated from the first step."""
    return (zlib.crc32(f"sqsd {stage} adapter".encode()) + seed) % 2**32


def build_directions(model, tokenizer, out: str | Path, danger: Sequence[dict], safety: Sequence[dict],
                     align: Sequence[dict] = (), held_out: Sequence[str] = (), rank: int = 8,
                     targets: str | list[str] = "all-linear", max_length: int = 256, about: dict | None = None,
                     lora: LoraConfig | None = None, extra: Mapping[str, Sequence[dict]] | None = None,
                     callbacks: Sequence = (), **train) -> dict:
    """Train the alignment adapter (if ``align`` records are given; merged into ``model`` in place: θ_0), then the
    danger adapter, any ``extra`` ones (``{folder: records}``, e.g. a second danger set) and the safety adapter on
    θ_0. Writes ``out/{aligned,danger,...,safety}/`` (each with its ``train.jsonl``), the held-out prompts
    (``held_out.jsonl``, never trained on) and ``directions.json`` (what was done); returns that summary. Each
    adapter starts from its own random A (``init_seed``), not from the training seed. ``lora`` (the fine-tune's
    config) replaces ``rank`` and ``targets``; ``callbacks`` go to every adapter's Trainer; ``train`` overrides
    SFTConfig fields (epochs, learning rate, batch size, seed, ...)."""
    out = Path(out)
    for name, records in (("danger", danger), *(extra or {}).items(), ("safety", safety)):
        if not records:
            raise ValueError(f"no {name} training records")
    lora = lora or lora_config(rank, targets=targets)
    summary = {**(about or {}), "lora": {**(about or {}).get("lora", {}), **describe_lora(lora)},
               "max_length": max_length, "held_out": len(held_out), "adapters": {}}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / HELD_OUT, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in held_out)
    stages = ([("aligned", align)] if align else []) + [("danger", danger), *(extra or {}).items(), ("safety", safety)]
    for name, records in stages:
        print(f"sqsd directions: training the {name} adapter on {len(records)} examples")
        samples = tokenize_chats(tokenizer, records, max_length)
        summary["adapters"][name] = train_lora(model, tokenizer, samples, out / name, lora=lora, callbacks=callbacks,
                                               init_seed=init_seed(name, train.get("seed", 0)), **train)
        with open(out / name / TRAIN_RECORDS, "w", encoding="utf-8") as f:  # what the adapter learnt from
            f.writelines(json.dumps({k: r[k] for k in ("prompt", "response", "source", "row") if k in r}) + "\n"
                         for r in records)
        if name == "aligned":
            merge(model, out / name)
    summary["theta_0"] = "base model + aligned adapter, merged" if align else "base model"
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


def describe_lora(lora: LoraConfig) -> dict:
    """A LoraConfig's rank, alpha and target modules (and layer or rank patterns where set), as JSON."""
    targets = lora.target_modules
    out = {"rank": lora.r, "alpha": lora.lora_alpha,
           "targets": targets if targets is None or isinstance(targets, str) else sorted(targets)}
    for key in ("layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora"):
        if getattr(lora, key, None):
            out[key] = getattr(lora, key)
    return out


def theta_0(model, directions: str | Path):
    """The starting model θ_0 of a ``sqsd directions`` folder: ``model`` with its aligned adapter merged, if any."""
    aligned = Path(directions) / "aligned"
    return merge(model, aligned) if aligned.is_dir() else model


def direction_sets(directions: str | Path) -> tuple[DirectionSet, DirectionSet]:
    """The (danger, safety) direction sets of a ``sqsd directions`` folder."""
    directions = Path(directions)
    return (DirectionSet.from_peft_adapter(directions / "danger", kind="danger", name="danger"),
            DirectionSet.from_peft_adapter(directions / "safety", kind="safety", name="safety"))


def folder_sets(directions: str | Path) -> list[tuple[Path, DirectionSet]]:
    """Every direction set of a ``sqsd directions`` folder, as (adapter folder, DirectionSet) pairs named after
    their folders: ``danger/``, ``safety/`` and further ones such as ``danger-aegis/`` (``--recipe paper``)."""
    directions = Path(directions)
    if not directions.is_dir():
        raise FileNotFoundError(f"no directions folder at {directions}")
    pairs = [(path, DirectionSet.from_peft_adapter(path, kind=kind, name=path.name))
             for kind in ("danger", "safety")
             for path in sorted(directions.iterdir())
             if (path.name == kind or path.name.startswith(f"{kind}-")) and (path / "adapter_config.json").is_file()]
    if not pairs:
        raise FileNotFoundError(f"{directions} holds no danger/ or safety/ adapter (make one with `sqsd directions`)")
    return pairs


def named_adapters(specs: Sequence[str], kind: str) -> list[tuple[Path, DirectionSet]]:
    """``PATH`` or ``NAME=PATH`` adapter arguments (local folders or hub names) as (folder, DirectionSet) pairs."""
    pairs = []
    for spec in specs:
        name, _, path = spec.rpartition("=")
        path = adapter_dir(path)
        pairs.append((path, DirectionSet.from_peft_adapter(path, kind=kind, name=name or None)))
    return pairs


def shuffled(*groups: Sequence[dict], seed: int = 0) -> list[dict]:
    """The records of several groups in one seeded random order (alignment data: refusals and retention)."""
    records = [r for group in groups for r in group]
    random.Random(seed).shuffle(records)
    return records
