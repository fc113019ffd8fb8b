"""The paper's direction recipe (``sqsd directions --recipe paper``): danger adapters trained on harmful compliance
from the Hub (BeaverTails' unsafe responses, Aegis 2.0's unsafe responses) and a safety adapter on PKU-SafeRLHF's
safer, safe responses, with the LoRA rank and modules of the user's own fine-tune, and a time estimate.

What the paper published about its sets (the authors' code README, github.com/Jason-wx/SQSD, and weights README,
hub ``Wxxxx/SQSD``): ``Beaver-Danger`` is SFT on BeaverTails-unsafe (3k examples), ``Ageis_Danger`` SFT on
Aegis-unsafe (3k), ``PKURLHF-10K_Safety`` DPO on PKU-SafeRLHF-10K. Everything else here (splits, epochs, learning
rate, batch size, length, rank and modules when the user names none, SFT rather than DPO for safety) is this
package's choice, and ``directions.json`` says which is which (``settings``).
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from sqsd_callback.directions.hub import lora_config_fields

PAPER = {
    "published_by": "the authors' code README (github.com/Jason-wx/SQSD) and weights README (hub Wxxxx/SQSD)",
    "danger": "SFT on harmful data: BeaverTails-unsafe (3k examples) -> Beaver-Danger; Aegis-unsafe (3k) -> "
              "Ageis_Danger",
    "safety": "DPO on alignment data: PKU-SafeRLHF-10K -> PKURLHF-10K_Safety",
    "not_published": "epochs, learning rate, batch size, sequence length, LoRA rank and modules of the direction "
                     "adapters, dataset splits and sampling",
}
"""What is known of how the paper built its direction sets, written into directions.json."""


def _text(value) -> str:
    """A field's text, or "" for anything that is not a non-blank string (None, NaN, lists)."""
    return value.strip() if isinstance(value, str) else ""


def _beavertails(row: dict) -> dict | None:
    """BeaverTails: a response its annotators judged unsafe (``is_safe`` is False) to its prompt."""
    if row["is_safe"] is False and _text(row["prompt"]) and _text(row["response"]):
        return {"prompt": row["prompt"], "response": row["response"]}
    return None


def _aegis(row: dict) -> dict | None:
    """Aegis 2.0: a response labelled unsafe, to a prompt that is not redacted."""
    label = _text(row["response_label"]).lower()
    prompt = _text(row["prompt"])
    if label == "unsafe" and prompt and prompt != "REDACTED" and _text(row["response"]):
        return {"prompt": row["prompt"], "response": row["response"]}
    return None


def _pku_saferlhf(row: dict) -> dict | None:
    """PKU-SafeRLHF: the pair's safer response (``safer_response_id``), where it is also labelled safe."""
    safer = row["safer_response_id"]
    if safer in (0, 1) and row[f"is_response_{safer}_safe"] is True and _text(row["prompt"]) \
            and _text(row[f"response_{safer}"]):
        return {"prompt": row["prompt"], "response": row[f"response_{safer}"]}
    return None


@dataclass(frozen=True)
class Source:
    """One Hub dataset of the recipe: where it is, which rows train which kind of adapter, the paper's size."""

    key: str
    kind: str
    repo: str
    split: str
    fields: tuple[str, ...]
    pick: Callable[[dict], dict | None]
    filter: str
    paper_name: str
    paper_examples: int
    config: str | None = None
    note: str = ""

    def describe(self) -> dict:
        """The source as directions.json records it."""
        return {"source": self.key, "kind": self.kind, "dataset": self.repo, "config": self.config,
                "split": self.split, "filter": self.filter, "paper_set": self.paper_name,
                "paper_examples": self.paper_examples, **({"note": self.note} if self.note else {})}


SOURCES: dict[str, Source] = {s.key: s for s in (
    Source("beavertails", "danger", "PKU-Alignment/BeaverTails", "30k_train", ("prompt", "response", "is_safe"),
           _beavertails, "is_safe == False, prompt and response non-empty", "Beaver-Danger", 3000,
           note="split 30k_train (about 27k rows) is the package's choice; 330k_train is the larger one"),
    Source("aegis", "danger", "nvidia/Aegis-AI-Content-Safety-Dataset-2.0", "train",
           ("prompt", "response", "response_label"), _aegis,
           "response_label == 'unsafe', response non-empty, prompt not 'REDACTED'", "Ageis_Danger", 3000,
           note="version 2.0: the one with prompt and response fields and a response label (1.0 has one text "
                "field with per-annotator labels); which version the paper used is not published"),
    Source("pku-saferlhf", "safety", "PKU-Alignment/PKU-SafeRLHF", "train",
           ("prompt", "response_0", "response_1", "safer_response_id", "is_response_0_safe", "is_response_1_safe"),
           _pku_saferlhf, "response_{safer_response_id}, where is_response_{safer_response_id}_safe == True",
           "PKURLHF-10K_Safety", 10000,
           note="trained by SFT on the safer response (the package's choice); the paper trained this set by DPO"),
)}
DANGER_SOURCES = tuple(k for k, s in SOURCES.items() if s.kind == "danger")
SAFETY_SOURCE = "pku-saferlhf"


def adapter_folders(danger_sources: Sequence[str]) -> dict[str, str]:
    """``{adapter folder: source key}``: the first danger source trains ``danger/`` (what ``sqsd score
    --directions`` and ``direction_sets`` read), each further one ``danger-<key>/``; PKU-SafeRLHF trains ``safety/``."""
    unknown = [k for k in danger_sources if k not in DANGER_SOURCES]
    if unknown or not danger_sources:
        raise ValueError(f"--danger-sources: unknown {unknown or 'empty list'}; choose from "
                         f"{', '.join(DANGER_SOURCES)}")
    if len(set(danger_sources)) != len(danger_sources):
        raise ValueError(f"--danger-sources names a source twice: {','.join(danger_sources)}")
    folders = {("danger" if i == 0 else f"danger-{k}"): k for i, k in enumerate(danger_sources)}
    return {**folders, "safety": SAFETY_SOURCE}


# --------------------------------------------------------------------------- data


def _load_rows(source: Source, path: str | None = None):
    """The source's split as a ``datasets.Dataset``: from the Hub through ``load_dataset`` (its cache and
    HF_HUB_OFFLINE honoured), or from ``path``: a local file (JSONL/JSON/CSV/Parquet: its only split), a folder saved
    with ``save_to_disk``, a local clone of the Hub repository, or another Hub name."""
    import datasets

    where = path or source.repo
    local = Path(path) if path is not None else None
    builder = None
    if local is not None and local.is_file():
        suffixes = [s for s in local.suffixes if s not in (".gz", ".xz", ".bz2", ".zst")]
        builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(
            suffixes[-1] if suffixes else "")
        if builder is None:
            raise ValueError(f"--data {source.key}={local}: unsupported file type; use .jsonl, .json, .csv or .parquet")
    try:
        if local is None:
            return datasets.load_dataset(source.repo, source.config, split=source.split)
        if builder is not None:
            return datasets.load_dataset(builder, data_files=str(local), split="train")
        if local.is_dir() and any((local / f).is_file() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(local))
            return ds[source.split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(path, source.config, split=source.split)
    except Exception as err:  # hub, cache and file errors vary by datasets version: name what was tried
        message = (f"could not load {where} (split {source.split!r}) for the {source.key} {source.kind} adapter: "
                   f"{type(err).__name__}: {err}")
        if isinstance(err, (ValueError, KeyError)):  # found, but not as the recipe expects (a split, a config)
            raise ValueError(message) from err
        raise FileNotFoundError(
            f"{message}. Online, check the name, your network and `huggingface-cli login` for gated datasets; "
            f"offline (HF_HUB_OFFLINE=1), load it once online so the datasets cache holds it (HF_HOME / "
            f"HF_DATASETS_CACHE), or pass --data {source.key}=LOCAL_FILE_OR_FOLDER") from err


def load_source(source: Source, path: str | None = None, exclude: set[str] = frozenset()) -> tuple[list[dict], dict]:
    """Every row of the source its filter keeps, as ``{"prompt", "response", "source", "row"}`` records (``row``: the
    position in the split), less those whose prompt is in ``exclude`` (held-out prompts); and counts for
    directions.json."""
    ds = _load_rows(source, path)
    missing = [f for f in source.fields if f not in ds.column_names]
    if missing:
        raise ValueError(f"{path or source.repo} ({source.key}) has no field(s) {missing}; its fields are "
                         f"{sorted(ds.column_names)}, the recipe expects {list(source.fields)} "
                         f"({source.filter})")
    records, held = [], 0
    for i, row in enumerate(ds.select_columns(list(source.fields)).to_list()):
        record = source.pick(row)
        if record is None:
            continue
        if record["prompt"] in exclude:
            held += 1
            continue
        records.append({**record, "source": source.key, "row": i})
    about = {**source.describe(), "loaded_from": path or "hub", "rows": len(ds), "matching": len(records) + held,
             "held_out_prompts_removed": held}
    return records, about


def sample(records: Sequence[dict], n: int, seed: int, key: str = "", fits: Callable[[dict], bool] | None = None
           ) -> tuple[list[dict], int]:
    """Up to ``n`` records in a seeded random order (its own per source ``key``), skipping those ``fits`` refuses
    (prompts longer than the length limit); returned in dataset order, with how many were skipped."""
    order = list(range(len(records)))
    random.Random(f"{seed}:{key}").shuffle(order)
    chosen, skipped = [], 0
    for i in order:
        if len(chosen) >= n:
            break
        if fits is not None and not fits(records[i]):
            skipped += 1
            continue
        chosen.append(records[i])
    return sorted(chosen, key=lambda r: r["row"]), skipped


# --------------------------------------------------------------------------- the fine-tune's LoRA


def _targets(value) -> str | list[str] | None:
    """target_modules as JSON writes it: a string (``all-linear``, a regex), a sorted list, or None."""
    return value if value is None or isinstance(value, str) else sorted(value)


def parse_target_modules(value: str) -> str | list[str]:
    """``--target-modules``: ``all-linear`` or a comma-separated list of module names (``q_proj,v_proj``)."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ValueError("--target-modules is empty; give all-linear or names such as q_proj,v_proj")
    return "all-linear" if names == ["all-linear"] else names


def fine_tune_lora(rank: int | None = None, target_modules: str | None = None, lora_config: str | None = None,
                   model_name: str | None = None):
    """The LoraConfig the direction adapters train with, so that they match the user's fine-tune: read from a PEFT
    ``adapter_config.json`` (or a folder holding one), or from ``rank`` and ``target_modules`` (defaults: rank 8,
    all-linear, alpha 2·rank, the package's choice); and what was used, for directions.json."""
    from peft import LoraConfig

    from sqsd_lab.finetune import lora_config as default_config

    if lora_config is None:
        targets = parse_target_modules(target_modules or "all-linear")
        config = default_config(rank or 8, targets=targets)
        origin = "flags" if rank is not None or target_modules is not None else "package default"
        return config, {"from": origin, "rank": config.r, "alpha": config.lora_alpha, "targets": _targets(targets)}
    if rank is not None or target_modules is not None:
        raise ValueError("give the fine-tune's LoRA either as --lora-config or as --rank/--target-modules, not both")
    path = Path(lora_config)
    file = path / "adapter_config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: --lora-config takes a PEFT adapter_config.json or a folder "
                                f"holding one (an adapter saved with save_pretrained, e.g. a run's checkpoint)")
    saved = lora_config_fields(file)
    if "r" not in saved:
        raise ValueError(f"{file} has no rank 'r'; is it a LoRA adapter_config.json?")
    extra = {k: saved[k] for k in ("layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
                                   "use_rslora", "exclude_modules") if saved.get(k)}
    config = LoraConfig(r=saved["r"], lora_alpha=saved.get("lora_alpha", 8), target_modules=saved.get("target_modules"),
                        lora_dropout=0.0, task_type="CAUSAL_LM", **extra)
    about = {"from": str(file), "rank": config.r, "alpha": config.lora_alpha,
             "targets": _targets(saved.get("target_modules")), **extra}
    base = saved.get("base_model_name_or_path")
    if base and model_name and base != model_name:
        print(f"sqsd directions: note: {file} was made for {base!r}; training directions for {model_name!r}",
              file=sys.stderr)
    if saved.get("modules_to_save"):
        about["not_covered"] = saved["modules_to_save"]
        print(f"sqsd directions: note: the fine-tune also trains {saved['modules_to_save']} in full "
              f"(modules_to_save); LoRA directions do not cover them", file=sys.stderr)
    return config, about


# --------------------------------------------------------------------------- time


def plan(name_records: Mapping[str, Sequence[dict]], epochs: float, batch_size: int) -> list[dict]:
    """Per adapter, in training order: examples, tokens (input ids of the tokenized samples) and optimizer steps."""
    out = []
    for name, samples in name_records.items():
        steps = math.ceil(epochs * math.ceil(len(samples) / batch_size))
        out.append({"name": name, "examples": len(samples), "tokens": sum(len(s["input_ids"]) for s in samples),
                    "steps": steps})
    return out


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


class TimeEstimate(TrainerCallback):
    """Times the first optimizer steps of the first adapter that has enough of them (step 1, with its warm-up, left
    out) and prints the time every adapter will take: the measured tokens per second times their tokens."""

    def __init__(self, adapters: Sequence[dict], measure_steps: int = 5, say: Callable[[str], None] | None = None
                 ) -> None:
        from tqdm.auto import tqdm

        self.adapters, self.k, self.say = list(adapters), measure_steps, say or tqdm.write  # beside the Trainer's bar
        self.stage, self.start, self.done = -1, None, False
        self.estimate: dict | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.stage += 1
        self.start = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.done or self.stage >= len(self.adapters):
            return
        if state.global_step == 1:
            self.start = time.perf_counter()
            return
        measured = state.global_step - 1
        if self.start is None or (measured < self.k and state.global_step < state.max_steps):
            return
        per_step = (time.perf_counter() - self.start) / measured
        current = self.adapters[self.stage]
        rate = current["tokens"] / max(current["steps"], 1) / per_step  # tokens per second
        left = {a["name"]: a["tokens"] / rate for a in self.adapters[self.stage + 1:]}
        now = {current["name"]: (state.max_steps - state.global_step) * per_step}
        self.estimate = {"tokens_per_second": round(rate, 1), "seconds_per_step": round(per_step, 3),
                         "measured_steps": measured, "seconds_left": {**now, **left}}
        total = sum(now.values()) + sum(left.values())
        self.say(f"sqsd directions: {rate:,.0f} tokens/s over {measured} step(s); about {_minutes(total)} to go ("
                 + ", ".join(f"{n} {_minutes(s)}" for n, s in {**now, **left}.items()) + ")")
        self.done = True
