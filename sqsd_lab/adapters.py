"""The alignment, danger and safety adapters (``sqsd directions``): their training data and their training.

Danger: harmful prompts → compliant responses; safety: harmful prompts → refusals; both LoRA adapters trained on
θ_0 with the loss on response tokens only. Where the base model is too weakly aligned to refuse, an alignment
adapter (refusals on part of the harmful prompts plus benign retention data) is trained first and merged: θ_0.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Sequence
from pathlib import Path

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
                     **train) -> dict:
    """Train the alignment adapter (if ``align`` records are given; merged into ``model`` in place: θ_0), then the
    danger and safety adapters on θ_0. Writes ``out/{aligned,danger,safety}/`` (each with its ``train.jsonl``),
    the held-out prompts (``held_out.jsonl``, never trained on) and ``directions.json`` (what was done); returns
    that summary. Each adapter starts from its own random A (``init_seed``), not from the training seed.
    ``train`` overrides SFTConfig fields (epochs, learning rate, batch size, seed, ...)."""
    out = Path(out)
    for name, records in (("danger", danger), ("safety", safety)):
        if not records:
            raise ValueError(f"no {name} training records")
    lora = lora_config(rank, targets=targets)
    summary = {**(about or {}), "lora": {"rank": rank, "alpha": lora.lora_alpha, "targets": targets},
               "max_length": max_length, "held_out": len(held_out), "adapters": {}}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / HELD_OUT, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in held_out)
    stages = ([("aligned", align)] if align else []) + [("danger", danger), ("safety", safety)]
    for name, records in stages:
        print(f"sqsd directions: training the {name} adapter on {len(records)} examples")
        samples = tokenize_chats(tokenizer, records, max_length)
        summary["adapters"][name] = train_lora(model, tokenizer, samples, out / name, lora=lora,
                                               init_seed=init_seed(name, train.get("seed", 0)), **train)
        with open(out / name / TRAIN_RECORDS, "w", encoding="utf-8") as f:  # what the adapter learnt from
            f.writelines(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n" for r in records)
        if name == "aligned":
            merge(model, out / name)
    summary["theta_0"] = "base model + aligned adapter, merged" if align else "base model"
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


def theta_0(model, directions: str | Path):
    """The starting model θ_0 of a ``sqsd directions`` folder: ``model`` with its aligned adapter merged, if any."""
    aligned = Path(directions) / "aligned"
    return merge(model, aligned) if aligned.is_dir() else model


def direction_sets(directions: str | Path) -> tuple[DirectionSet, DirectionSet]:
    """The (danger, safety) direction sets of a ``sqsd directions`` folder."""
    directions = Path(directions)
    return (DirectionSet.from_peft_adapter(directions / "danger", kind="danger", name="danger"),
            DirectionSet.from_peft_adapter(directions / "safety", kind="safety", name="safety"))


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
