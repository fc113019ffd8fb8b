"""Direction sets: one matrix per weight matrix ("module"), dense or in low-rank factors.

A danger set points where harmful fine-tuning moves the weights, a safety set where safety
training moves them. Keys are the base model's own module names
(``model.layers.0.self_attn.q_proj``) whatever PEFT wrapping the training model has.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

KINDS = ("danger", "safety")
_PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """The base model's own module name: PEFT's ``base_model.model.`` prefix removed."""
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


@dataclass
class Direction:
    """V for one module: ``dense`` (out×in), or ``B @ A`` with ``B`` (out×k) and ``A`` (k×in)."""

    dense: torch.Tensor | None = None
    B: torch.Tensor | None = None
    A: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        if self.dense is not None:
            return tuple(self.dense.shape)
        return (self.B.shape[0], self.A.shape[1])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.dense, self.B, self.A) if t is not None]

    def sq_norm(self) -> float:
        """‖V‖²_F, from the k×k Gram matrices when V is low-rank (never forms out×in); contiguous copies, so that
        the value does not depend on whether the factors are views of an engine's stack."""
        if self.dense is not None:
            return float(self.dense.double().pow(2).sum())
        B, A = self.B.double().contiguous(), self.A.double().contiguous()
        return float(((B.T @ B) * (A @ A.T)).sum())

    def same_as(self, other: Direction) -> bool:
        """Whether both hold the same stored tensors (the same adapter loaded twice)."""
        mine, theirs = self.tensors(), other.tensors()
        return len(mine) == len(theirs) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(mine, theirs))

    def materialize(self) -> torch.Tensor:
        """Dense V (out×in), at least fp32 (a product of bf16 factors is formed in fp32). For oracles and small
        models only."""
        return self.dense.float() if self.dense is not None else self.B.float() @ self.A.float()

    def times_right(self, M: torch.Tensor) -> torch.Tensor:
        """V @ M for M (in×r), through the factors when V is low-rank; in M's dtype."""
        if self.dense is not None:
            return self.dense.to(M.dtype) @ M
        return self.B.to(M.dtype) @ (self.A.to(M.dtype) @ M)

    def times_left(self, M: torch.Tensor) -> torch.Tensor:
        """M @ V for M (r×out), through the factors when V is low-rank; in M's dtype."""
        if self.dense is not None:
            return M @ self.dense.to(M.dtype)
        return (M @ self.B.to(M.dtype)) @ self.A.to(M.dtype)

    def to(self, device=None, dtype=None) -> Direction:
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)
        return Direction(move(self.dense), move(self.B), move(self.A))


class DirectionSet:
    """A named danger or safety direction set: ``{module name: Direction}``."""

    def __init__(self, modules: Mapping[str, Direction], kind: str, name: str, source: str = "") -> None:
        if kind not in KINDS:
            raise ValueError(f"DirectionSet kind must be one of {KINDS}, got {kind!r}.")
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
        from .finetune import adapter_dir
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
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_file} is not valid JSON ({err}); re-save the adapter.") from err
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{path} is a {config['peft_type']} adapter; direction sets need a LoRA adapter.")
        if config.get("use_dora"):
            raise ValueError(f"{path} is a DoRA adapter; its update is not B@A. Use a plain LoRA adapter.")
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
        a_sd, b_sd = _linear_weights(aligned), _linear_weights(base)
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
                f"Direction set {self.name!r}: {len(wrong)} module(s) have the wrong shape, e.g. {m}: direction "
                f"{have} vs model weight {want}. The directions were made for a model of another size."
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


def _linear_weights(model_or_state) -> dict[str, torch.Tensor]:
    """Linear weights by canonical module name, out×in, from an nn.Module or a state dict (2-D ``.weight`` entries,
    taken as nn.Linear's out×in layout). In a model, GPT-2-style ``Conv1D`` layers (weights stored in×out, PEFT's
    ``fan_in_fan_out``) are turned to out×in by their layer kind (``weight_oi``), so that their directions line up
    with LoRA's B·A."""
    if isinstance(model_or_state, torch.nn.Module):
        from transformers.pytorch_utils import Conv1D

        from .layers import Conv1DTarget, LinearTarget
        return {canonical_name(n): (Conv1DTarget if isinstance(m, Conv1D) else LinearTarget)(n, m).weight_oi.detach()
                for n, m in model_or_state.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    return {canonical_name(k[: -len(".weight")]): v for k, v in model_or_state.items()
            if k.endswith(".weight") and getattr(v, "dim", lambda: 0)() == 2}


class DirectionBank:
    """Several direction sets validated against one model and laid out per covered module: the engines read
    ``per_module[m]`` (one Direction or None per set), scoring reads ``v_norm`` and ``present`` (M×K)."""

    def __init__(self, sets: list[DirectionSet], shapes: Mapping[str, tuple[int, int]]) -> None:
        if not sets:
            raise ValueError("No direction sets given: pass danger=[DirectionSet(...)] and/or safety=[...].")
        names = [f"{s.kind}/{s.name}" for s in sets]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"Direction set names must be unique per kind; repeated: {sorted(dup)}. "
                             f"Pass name=... when loading.")
        matched = [set(s.match(shapes)) for s in sets]
        self.sets = sets
        self.keys = names
        self.modules = [m for m in shapes if any(m in mk for mk in matched)]
        self.per_module = {m: [s.modules[m] if m in mk else None for s, mk in zip(sets, matched)]
                           for m in self.modules}
        self.present = torch.tensor([[d is not None for d in self.per_module[m]] for m in self.modules])
        self.v_norm = torch.tensor(
            [[math.sqrt(d.sq_norm()) if d is not None else 0.0 for d in self.per_module[m]] for m in self.modules],
            dtype=torch.float64,
        )
        self._stacks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._warned_mixed = False

    def to(self, device) -> DirectionBank:
        """Move every direction to ``device`` once, before the first step, in its set's dtype (the engines compute in
        fp32: a bf16 set takes half the memory of an fp32 one)."""
        for m, dirs in self.per_module.items():
            self.per_module[m] = [None if d is None else d.to(device) for d in dirs]
        self._stacks = {}
        return self

    def stacked(self, modules: list[str], sets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The low-rank factors of ``sets`` (indices into ``sets``) for ``modules``, side by side and stacked over
        the modules: B_V (L×out×Q) and A_Vᵀ (L×in×Q). Made once per bank; the bank's per-module factors and the
        direction sets' own become views of them, so the engine, the drift, the bank and the sets hold one copy
        (the sets' earlier tensors are freed where nothing else holds them)."""
        key = (tuple(modules), tuple(sets))
        if key not in self._stacks:
            dtypes = {self.per_module[m][k].B.dtype for m in modules for k in sets}
            if len(dtypes) > 1 and not self._warned_mixed:
                self._warned_mixed = True
                warnings.warn(f"Direction sets in different dtypes ({', '.join(sorted(map(str, dtypes)))}) are "
                              f"stacked together in the widest, so the narrower sets take its memory (their own "
                              f"tensors become views of the stack); give every set one dtype, e.g. "
                              f"set.to(dtype=torch.bfloat16), to hold them in half precision.", stacklevel=3)
            VB = torch.stack([torch.cat([self.per_module[m][k].B for k in sets], 1) for m in modules])
            VAt = torch.stack([torch.cat([self.per_module[m][k].A.T for k in sets], 1) for m in modules])
            for m, b, at in zip(modules, VB, VAt):
                col = 0
                for k in sets:
                    width = self.per_module[m][k].B.shape[1]
                    view = Direction(B=b[:, col:col + width], A=at[:, col:col + width].T)
                    self.per_module[m][k] = view
                    if self.sets[k].modules[m].B.device == view.B.device:  # the same values, now one copy
                        self.sets[k].modules[m] = view
                    col += width
            self._stacks[key] = (VB, VAt)
        return self._stacks[key]


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a torn or foreign file is an error naming it."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for bad headers and short files
        raise ValueError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); it may be "
                         f"truncated (an interrupted download or save): download or save it again.") from err


def a_cosine(factors: Mapping[str, torch.Tensor], direction_set: DirectionSet) -> tuple[float, int]:
    """Mean |cosine| between LoRA A factors ``{module: A (k×in)}`` and a low-rank set's own A, over the modules where
    both have one shape, and how many those are: about 1/√(k·in) for independent random draws, about 1 for
    adapters initialised from one seed."""
    cosines = []
    for m, A in factors.items():
        v = direction_set.modules.get(m)
        if v is None or v.A is None or v.A.shape != A.shape:
            continue
        mine, theirs = A.detach().double().reshape(-1), v.A.to(A.device).double().reshape(-1)
        cosines.append(abs(float(mine @ theirs)) / max(float(mine.norm() * theirs.norm()), 1e-300))
    return (sum(cosines) / len(cosines) if cosines else 0.0), len(cosines)


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
