"""SafeLoRA after training (Hsu et al., NeurIPS 2024, "Safe LoRA: the Silver Lining of Reducing Safety Risks when
Fine-tuning Large Language Models"): each LoRA module's update is compared with the alignment direction of its
weight and, where the two are least alike, replaced by its image under that direction's projection.

For a module with alignment matrix V = W_aligned − W_base (out×in) the paper's (and its code's) projection is
C = V Vᵀ / ‖V‖_F (out×out, the Frobenius norm itself, not its square), the module's similarity is
cos(ΔW, C ΔW) under the Frobenius inner product, with ΔW = s·B A, and a selected module's update becomes C ΔW,
kept in LoRA form as B' = C B. The scale s cancels in the cosine and rides on B'A unchanged, so it is never needed.
C is never formed: C B = V (Vᵀ B) / ‖V‖_F, and the cosine comes from r×r products of the factors, so no dense
out×out or ΔW matrix is made and at most one module's out×in weights are held at a time."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .directions.hub import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_dir, lora_config_fields
from .naming import canonical_name

REPORT = "safelora.json"
FORMULA = "C = V Vᵀ / ‖V‖_F with V = W_aligned − W_base; similarity cos(ΔW, C ΔW); projected B' = C B"
NO_ALIGNMENT = "aligned == base here (V = 0): no alignment direction, left unchanged"
NO_UPDATE = "the adapter's update is zero here: nothing to project"


@dataclass
class ModuleResult:
    """One LoRA module's outcome: its similarity cos(ΔW, C ΔW) (None where undefined) and whether it was projected."""

    module: str
    similarity: float | None
    projected: bool = False
    note: str = ""


@dataclass
class SafeLoraReport:
    """What ``apply_safelora`` did: per module results, the selection rule, the projected adapter's state dict (PEFT's
    saved form, for ``set_peft_model_state_dict``) and the folder it was written to, if any."""

    modules: list[ModuleResult]
    threshold: float | None
    num_proj_layers: int | None
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    sources: dict[str, str] = field(default_factory=dict)
    out: Path | None = None

    @property
    def projected(self) -> list[str]:
        """The names of the modules whose update was replaced by C ΔW."""
        return [m.module for m in self.modules if m.projected]

    @property
    def mean_similarity(self) -> float | None:
        """The mean similarity over the modules where it is defined (None where none is)."""
        sims = [m.similarity for m in self.modules if m.similarity is not None]
        return sum(sims) / len(sims) if sims else None

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values (safelora.json)."""
        return {"method": "SafeLoRA (Hsu et al., NeurIPS 2024)", "formula": FORMULA,
                "select": "number" if self.num_proj_layers is not None else "threshold",
                "threshold": self.threshold, "num_proj_layers": self.num_proj_layers, **self.sources,
                "modules_total": len(self.modules), "projected": len(self.projected),
                "without_alignment_direction": sum(m.note == NO_ALIGNMENT for m in self.modules),
                "mean_similarity": self.mean_similarity,
                "modules": [vars(m) for m in self.modules]}


def apply_safelora(adapter, aligned, base=None, *, threshold: float = 0.5, num_proj_layers: int | None = None,
                   out: str | Path | None = None, config: Mapping | None = None) -> SafeLoraReport:
    """SafeLoRA on a fine-tuned LoRA ``adapter``: modules whose similarity cos(ΔW, C ΔW) is at or below ``threshold``
    (or, with ``num_proj_layers`` = k, the k least similar) get B' = C B, C = V Vᵀ / ‖V‖_F, V = W_aligned − W_base.

    ``adapter``: a PEFT adapter folder or Hub name, a ``PeftModel`` (its active adapter), or a PEFT state dict (with
    ``config``, its adapter_config fields). ``aligned``: the aligned model (folder or Hub name of safetensors
    weights, a model, or a state dict) with ``base`` its pre-alignment model; or a LoRA adapter (folder, Hub name or
    ``PeftModel``) that aligned ``base``, V being its merged update s·B A. ``out``: where to write the projected
    adapter (adapter_config.json, adapter_model.safetensors) and safelora.json. Each refusal names its fix."""
    if num_proj_layers is not None and num_proj_layers < 1:
        raise ValueError(f"num_proj_layers={num_proj_layers}: give the number of modules to project, at least 1")
    state, fields, about = _load_adapter(adapter, config)
    factors = _factors(state, fields, about)
    align = _Alignment(aligned, base, about)
    fan_in_fan_out = bool(fields.get("fan_in_fan_out"))
    results, candidates = [], {}
    for module, (a_key, b_key) in factors.items():
        A, B = state[a_key], state[b_key]
        shape = (B.shape[0], A.shape[1])
        align.check(module, shape, fan_in_fan_out)
        V = align.delta(module, fan_in_fan_out)
        if V is None or not V.any():
            results.append(ModuleResult(module, None, note=NO_ALIGNMENT))
        elif not A.any() or not B.any():
            results.append(ModuleResult(module, None, note=NO_UPDATE))
        else:
            B32 = B.float()
            CB = V @ (V.T @ B32) / torch.linalg.matrix_norm(V)  # C B, C never formed
            results.append(ModuleResult(module, _cosine(B32, CB, A.float())))
            candidates[module] = CB
        del V
    chosen = _select(results, threshold, num_proj_layers)
    projected = dict(state)
    for r in results:
        if r.module in chosen:
            r.projected = True
            b_key = factors[r.module][1]
            projected[b_key] = candidates[r.module].to(state[b_key].dtype)
    sources = {"adapter": about, "aligned": align.about, "base": align.base_about}
    report = SafeLoraReport(results, None if num_proj_layers is not None else threshold, num_proj_layers, projected,
                            sources)
    if out is not None:
        _write(report, Path(out), adapter, fields)
    return report


def _cosine(B: torch.Tensor, CB: torch.Tensor, A: torch.Tensor) -> float:
    """cos(B A, CB A) under the Frobenius inner product, from r×r products in float64: ⟨P A, Q A⟩ = tr(Pᵀ Q A Aᵀ);
    0 where C ΔW = 0 (the update orthogonal to V's columns), as the reference code's cosine_similarity gives."""
    B, CB, A = B.double(), CB.double(), A.double()
    G = A @ A.T

    def inner(P: torch.Tensor, Q: torch.Tensor) -> float:
        return float(torch.sum((P.T @ Q) * G))

    norms = math.sqrt(inner(B, B) * inner(CB, CB))
    return inner(B, CB) / norms if norms else 0.0


def _select(results: list[ModuleResult], threshold: float, k: int | None) -> set[str]:
    """The modules to project: those at or below ``threshold`` (the reference code's ``cos <= thrs``), or the ``k``
    least similar (ties broken by name)."""
    defined = [r for r in results if r.similarity is not None]
    if k is None:
        return {r.module for r in defined if r.similarity <= threshold}
    return {r.module for r in sorted(defined, key=lambda r: (r.similarity, r.module))[:k]}


def _is_peft_model(obj) -> bool:
    """True for a PeftModel: its active adapter is the LoRA, its base model beneath."""
    from peft import PeftModel
    return isinstance(obj, PeftModel)


def _load_adapter(adapter, config: Mapping | None) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(state dict in PEFT's saved form, adapter_config fields, a description) of a folder, Hub name, PeftModel or
    state dict."""
    if _is_peft_model(adapter):
        from peft import get_peft_model_state_dict
        name = adapter.active_adapter
        fields = adapter.peft_config[name].to_dict()
        state = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(adapter, adapter_name=name).items()}
        return state, fields, f"PeftModel (adapter {name!r})"
    if isinstance(adapter, Mapping):
        return {k: v.detach().cpu() for k, v in adapter.items()}, dict(config or {}), "state dict"
    path = adapter_dir(adapter)
    return _adapter_weights(path), lora_config_fields(path / ADAPTER_CONFIG), str(path)


def _adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder's adapter_model.safetensors (or PEFT's legacy .bin)."""
    safetensors, legacy = (path / w for w in ADAPTER_WEIGHTS)
    if safetensors.is_file():
        from safetensors.torch import load_file
        return load_file(str(safetensors))
    return torch.load(legacy, map_location="cpu", weights_only=True)


def _factors(state: Mapping[str, torch.Tensor], fields: Mapping, about: str) -> dict[str, tuple[str, str]]:
    """{module: (lora_A key, lora_B key)} of a plain LoRA adapter; anything SafeLoRA cannot project is refused."""
    if str(fields.get("peft_type", "LORA")).split(".")[-1] != "LORA":
        raise ValueError(f"{about} is a {fields['peft_type']} adapter; SafeLoRA projects LoRA updates only: "
                         f"fine-tune with a LoraConfig")
    if fields.get("use_dora") or any("lora_magnitude_vector" in k for k in state):
        raise ValueError(f"{about} is a DoRA adapter: its update is not s·B A, so C B A is not its projection; "
                         f"fine-tune with use_dora=False")
    if fields.get("bias", "none") != "none" or fields.get("lora_bias"):
        raise ValueError(f"{about} trains biases too (bias={fields.get('bias')!r}, lora_bias="
                         f"{bool(fields.get('lora_bias'))}); SafeLoRA projects B A only and the bias changes would "
                         f"pass unprojected: fine-tune with bias='none' and lora_bias=False")
    for key in ("modules_to_save", "trainable_token_indices"):
        if fields.get(key):
            raise ValueError(f"{about} also trains {key}={fields[key]!r}: whole modules or token rows that SafeLoRA "
                             f"cannot project; fine-tune without {key}")
    factors: dict[str, dict[str, str]] = {}
    for key, value in state.items():
        for part in ("lora_A", "lora_B"):
            if f".{part}." in key and key.endswith(".weight") and value.dim() == 2:
                factors.setdefault(canonical_name(key.split(f".{part}.")[0]), {})[part] = key
                break
        else:
            raise ValueError(f"{about}: {key!r} (shape {tuple(value.shape)}) is not a Linear layer's LoRA factor "
                             f"(embedding or convolution LoRA, or another PEFT method); SafeLoRA projects Linear "
                             f"layers' B A only: fine-tune with Linear target modules")
    unpaired = sorted(m for m, f in factors.items() if len(f) != 2)
    if unpaired:
        raise ValueError(f"{about}: modules {unpaired} have one LoRA factor of two; the adapter is torn, re-save it")
    if not factors:
        raise ValueError(f"{about} holds no LoRA factors: pass the fine-tuned adapter")
    return {m: (f["lora_A"], f["lora_B"]) for m, f in sorted(factors.items())}


class _Weights:
    """A model's 2-D weights by module name, read one at a time: from a folder's safetensors files (lazily), a model
    (PEFT-wrapped layers read through ``base_layer``) or a state dict."""

    def __init__(self, source, what: str) -> None:
        self.files: dict[str, Path] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        if isinstance(source, torch.nn.Module):
            self.about = f"in-memory {type(source).__name__}"
            named = dict(source.named_parameters())
        elif isinstance(source, Mapping):
            self.about, named = "state dict", dict(source)
        else:
            from safetensors import safe_open
            folder = _local(source)
            self.about = str(source)
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(str(file), "pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), file))
            if not self.files:
                raise ValueError(f"the {what} {source} holds no .safetensors weights: load the model (e.g. "
                                 f"sqsd_lab.load_model for a GGUF file) and pass it, or save it with "
                                 f"save_pretrained(dir, safe_serialization=True)")
            named = {}
        for key, value in named.items():
            if "lora_" not in key:
                self.tensors[canonical_name(key).replace(".base_layer.", ".")] = value

    def get(self, module: str) -> torch.Tensor | None:
        """A float32 CPU copy of ``module``'s weight, as stored (None where the model has no such weight); a copy, so
        that V can be formed in place without touching the caller's model."""
        key = f"{module}.weight"
        if key in self.tensors:
            return self.tensors[key].detach().to("cpu", torch.float32, copy=True)
        if key in self.files:
            from safetensors import safe_open
            with safe_open(str(self.files[key]), "pt") as f:
                return f.get_tensor(key).to(torch.float32)
        return None

    def shape(self, module: str) -> tuple[int, ...] | None:
        """``module``'s weight shape, read without loading it from files."""
        key = f"{module}.weight"
        if key in self.tensors:
            return tuple(self.tensors[key].shape)
        if key in self.files:
            from safetensors import safe_open
            with safe_open(str(self.files[key]), "pt") as f:
                return tuple(f.get_slice(key).get_shape())
        return None


def _local(source) -> Path:
    """A model or adapter's local folder: itself, or a Hub snapshot of its JSON and safetensors files."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise FileNotFoundError(f"{source} is not a model folder of safetensors weights nor a Hub name (org/name)"
                                f"{': load a GGUF model and pass it' if path.suffix == '.gguf' else ''}")
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors"]))


class _Alignment:
    """V = W_aligned − W_base per module: from two models' weights, or from an aligned LoRA adapter's s·B A."""

    def __init__(self, aligned, base, adapter_about: str) -> None:
        self.adapter: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None
        if not _is_peft_model(aligned) and not isinstance(aligned, (torch.nn.Module, Mapping)):
            aligned = _local(aligned)
        if _is_peft_model(aligned) or (isinstance(aligned, Path) and (aligned / ADAPTER_CONFIG).is_file()):
            self._load_adapter(aligned)
            self.aligned = None
        else:
            if base is None:
                raise ValueError("an aligned model needs its pre-alignment base: pass base= (--base)")
            self.aligned = _Weights(aligned, "aligned model")
            self.about = self.aligned.about
        self.base = None if base is None else _Weights(base, "base model")
        self.base_about = "not given" if base is None else self.base.about
        self.adapter_about = adapter_about

    def _load_adapter(self, aligned) -> None:
        """The aligned adapter's factors and scale s (lora_alpha / r, or / √r with rsLoRA; r per module from A)."""
        state, fields, self.about = _load_adapter(aligned, None)
        factors = _factors(state, fields, f"the aligned adapter {self.about}")
        if fields.get("alpha_pattern"):
            raise ValueError(f"the aligned adapter {self.about} sets alpha_pattern, which this reader does not "
                             f"apply: merge it into the base (merge_and_unload, save_pretrained) and pass that "
                             f"folder as the aligned model")
        alpha, rslora = float(fields.get("lora_alpha", 8)), bool(fields.get("use_rslora"))
        self.adapter = {}
        for module, (a_key, b_key) in factors.items():
            r = state[a_key].shape[0]
            self.adapter[module] = (state[a_key], state[b_key], alpha / (math.sqrt(r) if rslora else r))

    def check(self, module: str, shape: tuple[int, int], fan_in_fan_out: bool) -> None:
        """Refuse a module the models lack or whose weight is not the adapter's out×in (in×out for Conv1D)."""
        stored = shape[::-1] if fan_in_fan_out else shape
        for what, weights in (("base", self.base), ("aligned", self.aligned)):
            if weights is None:
                continue
            found = weights.shape(module)
            if found is None:
                raise ValueError(f"the {what} model {weights.about} has no weight {module}.weight, which the adapter "
                                 f"{self.adapter_about} trains: pass the models the adapter was trained on")
            if tuple(found) != stored:
                raise ValueError(f"{module}: the adapter's update is {shape[0]}×{shape[1]} (stored "
                                 f"{stored[0]}×{stored[1]}) but the {what} model {weights.about} holds "
                                 f"{'×'.join(map(str, found))}: pass the models the adapter was trained on")
        if self.adapter is not None and module in self.adapter:
            A, B, _ = self.adapter[module]
            if (B.shape[0], A.shape[1]) != shape:
                raise ValueError(f"{module}: the aligned adapter {self.about} updates {B.shape[0]}×{A.shape[1]}, "
                                 f"the fine-tuned adapter {shape[0]}×{shape[1]}: pass the aligned adapter of the "
                                 f"fine-tune's base model")

    def delta(self, module: str, fan_in_fan_out: bool) -> torch.Tensor | None:
        """V for ``module`` in float32, out×in (None where the aligned adapter does not train it)."""
        if self.adapter is not None:
            if module not in self.adapter:
                return None
            A, B, s = self.adapter[module]
            return s * (B.float() @ A.float())
        V = self.aligned.get(module)
        V -= self.base.get(module)
        return V.T if fan_in_fan_out else V


def _write(report: SafeLoraReport, out: Path, adapter, fields: Mapping) -> None:
    """The projected adapter in PEFT's format (its adapter_config.json as it was) and safelora.json, in ``out``."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    if _is_peft_model(adapter):
        adapter.peft_config[adapter.active_adapter].save_pretrained(str(out))
    elif isinstance(adapter, Mapping):
        if not fields:
            raise ValueError("a state dict carries no adapter_config.json: pass config= (its fields) to write one")
        (out / ADAPTER_CONFIG).write_text(json.dumps(dict(fields), indent=2, default=sorted))
    else:
        shutil.copyfile(adapter_dir(adapter) / ADAPTER_CONFIG, out / ADAPTER_CONFIG)
    save_file({k: v.contiguous() for k, v in report.state_dict.items()}, str(out / ADAPTER_WEIGHTS[0]),
              metadata={"format": "pt"})
    report.out = out
    (out / REPORT).write_text(json.dumps(report.to_dict(), indent=2))
