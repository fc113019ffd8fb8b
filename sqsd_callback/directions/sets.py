"""DirectionSet and its loaders (PEFT adapter, safetensors file, weight difference), its file format and checks. Keys
are the base model's own module names (``model.layers.0.self_attn.q_proj``) whatever PEFT wrapping the training
model has."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..layers import dense_weights
from ..naming import canonical_name
from ..types import Direction
from .hub import adapter_dir, lora_config_fields

SET_KINDS = ("danger", "safety")
"""The kinds of direction set: where harmful fine-tuning moves the weights, and where safety training does."""


class DirectionSet:
    """A named danger or safety direction set: ``{module name: Direction}``."""

    def __init__(self, modules: Mapping[str, Direction], kind: str, name: str, source: str = "") -> None:
        if kind not in SET_KINDS:
            raise ValueError(f"DirectionSet kind must be one of {SET_KINDS}, got {kind!r}.")
        if not modules:
            raise ValueError(f"Direction set {name!r} ({source or 'in memory'}) holds no module directions.")
        self.modules: dict[str, Direction] = {canonical_name(k): v for k, v in modules.items()}
        self.kind, self.name, self.source = kind, name, source
        self.energy_kept: dict[str, float] = {}  # from_weight_diff(rank=k): the fraction of ‖V‖² kept per module

    def __repr__(self) -> str:
        return f"DirectionSet(kind={self.kind!r}, name={self.name!r}, modules={len(self.modules)})"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the directions are held in (as stored: fp32, or bf16/fp16 for a half-precision file)."""
        return next(iter(self.modules.values())).tensors()[0].dtype

    def to(self, device=None, dtype: torch.dtype | None = None) -> DirectionSet:
        """The set on ``device`` and/or in ``dtype`` (a new set). ``torch.bfloat16`` halves the memory fp32
        directions take during training (SQSD holds every set beside the model: at LoRA rank r a set of rank r is
        as large as the adapter) at the cost of rounding them to bf16; scores are exact for the rounded
        directions, computed in fp32."""
        moved = DirectionSet({m: d.to(device, dtype) for m, d in self.modules.items()}, self.kind, self.name,
                             self.source)
        moved.energy_kept = dict(self.energy_kept)
        return moved

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, ref: str | Path, kind: str, name: str | None = None, subfolder: str | None = None,
                        revision: str | None = None, token=None, cache_dir: str | Path | None = None) -> DirectionSet:
        """A PEFT LoRA adapter in a local folder or a Hub repository (``"org/name"``, with ``subfolder`` and
        ``revision``; through huggingface_hub's cache, offline mode and the user's token); V = lora_B @ lora_A."""
        path = adapter_dir(ref, subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir)
        return cls.from_peft_adapter(path, kind, name or path.name)

    @classmethod
    def from_peft_adapter(cls, path: str | Path, kind: str, name: str | None = None) -> DirectionSet:
        """A local PEFT adapter directory (adapter_model.safetensors, or PEFT's legacy adapter_model.bin);
        V = lora_B @ lora_A per module (the adapter's scaling is irrelevant: every metric divides by ‖V‖)."""
        path = Path(path)
        config_file = path / "adapter_config.json"
        weights_file = next((path / w for w in ("adapter_model.safetensors", "adapter_model.bin")
                             if (path / w).is_file()), path / "adapter_model.safetensors")
        for f in (config_file, weights_file):
            if not f.is_file():
                raise FileNotFoundError(
                    f"{f} not found: a PEFT adapter directory needs adapter_config.json and "
                    f"adapter_model.safetensors (save it with `model.save_pretrained(dir)`)."
                )
        lora_config_fields(config_file)  # refuses other PEFT types and DoRA
        tensors = _load_safetensors(weights_file) if weights_file.suffix == ".safetensors" else \
            torch.load(weights_file, map_location="cpu", weights_only=True)
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            for part in ("lora_A", "lora_B"):
                marker = f".{part}."
                if marker in key and key.endswith("weight") and value.dim() == 2:
                    factors.setdefault(key.split(marker)[0], {})[part] = _as_stored(value)
        return cls(_low_rank(factors, weights_file), kind, name or path.name, source=str(path))

    @classmethod
    def from_safetensors(cls, path: str | Path, kind: str, name: str | None = None) -> DirectionSet:
        """Keys ``<module>.weight`` (out×in), or ``<module>.lora_A`` (k×in) with ``<module>.lora_B`` (out×k)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected a safetensors file of per-module directions.")
        modules: dict[str, Direction] = {}
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in _load_safetensors(path).items():
            stem, _, suffix = key.rpartition(".")
            if suffix == "weight" and value.dim() == 2:
                modules[stem] = Direction(dense=_as_stored(value))
            elif suffix in ("lora_A", "lora_B") and value.dim() == 2:
                pending.setdefault(stem, {})[suffix] = _as_stored(value)
            else:
                raise ValueError(
                    f"{path}: key {key!r} (shape {tuple(value.shape)}) is not '<module>.weight' (2-D) or "
                    f"'<module>.lora_A' / '<module>.lora_B'."
                )
        modules.update(_low_rank(pending, path))
        return cls(modules, kind, name or path.stem, source=str(path))

    @classmethod
    def from_weight_diff(
        cls, aligned, base, kind: str, name: str = "weight_diff", rank: int | None = None
    ) -> DirectionSet:
        """V = W_aligned − W_base per Linear weight (models or state dicts); ``rank=k`` keeps a truncated SVD
        and records the fraction of ‖V‖² kept in ``energy_kept``. Pass GPT-2-style models (Conv1D layers) as
        models: a state dict does not say which weights are stored in×out."""
        a_sd, b_sd = _weights(aligned), _weights(base)
        modules, energy = {}, {}
        for key, wa in a_sd.items():
            wb = b_sd.get(key)
            if wb is None or wb.shape != wa.shape:
                continue
            diff = wa.float() - wb.float()
            if rank is None:
                modules[key] = Direction(dense=diff)
                continue
            U, S, Vh = torch.linalg.svd(diff.double(), full_matrices=False)
            k = min(rank, S.numel())
            total = float(S.pow(2).sum())
            energy[key] = float(S[:k].pow(2).sum()) / total if total > 0 else 1.0
            modules[key] = Direction(B=(U[:, :k] * S[:k]).float(), A=Vh[:k].float())
        if not modules:
            raise ValueError("from_weight_diff: the two models share no 2-D weight of the same name and shape.")
        ds = cls(modules, kind, name, source="weight_diff")
        ds.energy_kept = energy
        return ds

    def save(self, path: str | Path) -> None:
        """Safetensors in the ``from_safetensors`` format; kind and name go in the file's metadata."""
        out = {}
        for module, d in self.modules.items():
            if d.dense is not None:
                out[f"{module}.weight"] = d.dense.contiguous()
            else:
                out[f"{module}.lora_A"] = d.A.contiguous()
                out[f"{module}.lora_B"] = d.B.contiguous()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(out, str(path), metadata={"kind": self.kind, "name": self.name})

    # --------------------------------------------------------------- validation
    def check_values(self) -> None:
        """Raise on NaN/Inf or zero-norm directions: they would make every score NaN or meaningless."""
        bad = [m for m, d in self.modules.items() if not all(torch.isfinite(t).all() for t in d.tensors())]
        if bad:
            raise ValueError(
                f"Direction set {self.name!r}: {len(bad)} module(s) contain NaN/Inf, e.g. {bad[:3]}. "
                f"Rebuild the directions (a diverged adapter?) or drop those modules."
            )
        zero = [m for m, d in self.modules.items() if d.sq_norm() == 0.0]
        if zero:
            raise ValueError(
                f"Direction set {self.name!r}: {len(zero)} module(s) have a zero direction, e.g. {zero[:3]} "
                f"(an untrained adapter has lora_B = 0). Train the adapter or drop those modules."
            )

    def match(self, shapes: Mapping[str, tuple[int, int]]) -> list[str]:
        """Module names this set shares with a model whose covered modules have ``shapes``; raises where the set
        cannot be meant for that model, warns with counts where it covers only part of it."""
        self.check_values()
        common = [m for m in shapes if m in self.modules]
        if not common:
            raise ValueError(
                f"Direction set {self.name!r} matches no module of the model: its modules look like "
                f"{sorted(self.modules)[:2]}, the model's trainable modules like {sorted(shapes)[:2]}. "
                f"The directions were made for another architecture, or for modules the model does not train "
                f"(check the LoRA target_modules) or SQSD does not score (a weight tied to another module's)."
            )
        wrong = [(m, self.modules[m].shape, tuple(shapes[m])) for m in common
                 if tuple(self.modules[m].shape) != tuple(shapes[m])]
        if wrong:
            m, have, want = wrong[0]
            raise ValueError(
                f"Direction set {self.name!r} ({self.source or 'in memory'}): {len(wrong)} module(s) have the wrong "
                f"shape, e.g. {m}: direction {have} vs model weight {want} (out×in). The directions were made for "
                f"a model of another size: build directions for this model (`sqsd directions --model ...`, or an "
                f"adapter trained on it) or use the model they were made for."
            )
        missing = len(shapes) - len(common)
        extra = len(self.modules) - len(common)
        if missing or extra:
            warnings.warn(
                f"Direction set {self.name!r} covers {len(common)} of the model's {len(shapes)} trained modules "
                f"({extra} of its {len(self.modules)} directions are for modules the model does not train or "
                f"SQSD does not score); "
                f"scores sum over the {len(common)} shared modules.",
                stacklevel=3,
            )
        return common


def _as_stored(t: torch.Tensor) -> torch.Tensor:
    """A loaded direction tensor in its stored dtype where that is fp32, bf16 or fp16 (half-precision files stay
    half the memory); any other dtype as fp32."""
    return t if t.dtype in (torch.float32, torch.bfloat16, torch.float16) else t.float()


def _low_rank(factors: dict[str, dict[str, torch.Tensor]], source) -> dict[str, Direction]:
    """``{module: {"lora_A", "lora_B"}}`` → low-rank Directions; a module with one factor only is an error."""
    out = {}
    for module, f in factors.items():
        if set(f) != {"lora_A", "lora_B"}:
            raise ValueError(f"{source}: module {module} has {sorted(f)} but needs both lora_A and lora_B.")
        out[module] = Direction(B=f["lora_B"], A=f["lora_A"])
    return out


def _weights(model_or_state) -> dict[str, torch.Tensor]:
    """Weights by canonical module name, out×in: from a model, every layer of a full fine-tuning kind, each turned by
    its kind (GPT-2's Conv1D stores in×out); from a state dict, its 2-D ``.weight`` entries as nn.Linear's out×in."""
    if isinstance(model_or_state, torch.nn.Module):
        return dense_weights(model_or_state)
    return {canonical_name(k[: -len(".weight")]): v for k, v in model_or_state.items()
            if k.endswith(".weight") and getattr(v, "dim", lambda: 0)() == 2}


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a torn or foreign file is an error naming it."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for bad headers and short files
        raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); it may be "
                         f"truncated (an interrupted download or save): download or save it again.") from err


def check_sets(danger: list[DirectionSet], safety: list[DirectionSet], anchor: DirectionSet | None = None) -> None:
    """Refuse, before any step, direction sets that cannot be scored as passed: a non-DirectionSet, a set passed
    as the other kind, non-finite values, and one set passed as danger and as safety (it cancels itself: SQSD = 0
    for every example)."""
    for s in [*danger, *safety, *([anchor] if anchor is not None else [])]:
        if not isinstance(s, DirectionSet):
            raise TypeError(f"danger/safety/anchor must be DirectionSet objects, got {type(s).__name__}.")
    for s, kind in [*((s, "danger") for s in danger), *((s, "safety") for s in safety)]:
        if s.kind != kind:
            raise ValueError(f"Direction set {s.name!r} is a {s.kind} set but was passed as {kind}.")
        s.check_values()
    for d in danger:
        for s in safety:
            if d.modules.keys() == s.modules.keys() and all(d.modules[m].same_as(s.modules[m]) for m in d.modules):
                raise ValueError(f"Danger set {d.name!r} and safety set {s.name!r} hold the same directions "
                                 f"(SQSD would be 0 for every example): check the adapter paths "
                                 f"({d.source!r}, {s.source!r}).")
