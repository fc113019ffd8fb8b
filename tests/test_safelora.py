"""SafeLoRA after training (sqsd_callback.safelora) against the paper's dense math in float64 on a tiny model: per
module V = W_aligned − W_base, C = V Vᵀ / ‖V‖_F, ΔW = s·B A, similarity cos(ΔW, C ΔW); the written adapter, loaded
by PEFT, must update by C ΔW where projected and ΔW elsewhere."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from sqsd_callback.safelora import NO_ALIGNMENT, REPORT, apply_safelora
from sqsd_lab.cli import main
from sqsd_lab.tiny import tiny_base, tiny_lora

TARGETS = ("q_proj", "v_proj", "down_proj")
ALIGNED_MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                   "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj")
"""Where the dense aligned model differs from the base; model.layers.0.self_attn.v_proj has no alignment direction."""
TOL = 1e-6


def _weight(model, module: str) -> torch.Tensor:
    return model.get_submodule(module).weight.detach().double()


def _dense_aligned(base, seed: int = 5, modules=ALIGNED_MODULES):
    """The base with a known random delta (rank 3 plus a dense part) on ``modules``."""
    aligned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            w = aligned.get_submodule(m).weight
            out, inp = w.shape
            w += torch.randn(out, 3, generator=g) @ torch.randn(3, inp, generator=g) * 0.3 \
                + 0.05 * torch.randn(out, inp, generator=g)
    return aligned


def _reference(base, aligned, finetuned) -> dict[str, dict]:
    """Per module, in float64 and dense: V, C = V Vᵀ / ‖V‖_F, ΔW = s B A, cos(ΔW, C ΔW) (None where V = 0)."""
    ref = {}
    for name, layer in finetuned.named_modules():
        if not hasattr(layer, "lora_A") or "default" not in layer.lora_A:
            continue
        module = name.removeprefix("base_model.model.")
        V = _weight(aligned, module) - _weight(base, module)
        V = V.T if layer.fan_in_fan_out else V  # GPT-2's Conv1D stores in×out
        s = layer.scaling["default"]
        dW = s * layer.lora_B["default"].weight.detach().double() @ layer.lora_A["default"].weight.detach().double()
        if not V.any():
            ref[module] = {"sim": None, "dW": dW, "CdW": None}
            continue
        C = V @ V.T / torch.linalg.matrix_norm(V)
        CdW = C @ dW
        ref[module] = {"sim": float((dW * CdW).sum() / (dW.norm() * CdW.norm())), "dW": dW, "CdW": CdW}
    return ref


def _delta_weights(base, folder) -> dict[str, torch.Tensor]:
    """Each LoRA module's dense update (out×in), as PEFT merges it, of the adapter in ``folder`` on ``base``."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
    deltas = {}
    for name, layer in model.named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            delta = layer.get_delta_weight("default").detach().double()
            deltas[name.removeprefix("base_model.model.")] = delta.T if layer.fan_in_fan_out else delta
    return deltas


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A base, a dense aligned model, both saved as safetensors folders, and a fine-tuned LoRA adapter (nonzero B)."""
    root = tmp_path_factory.mktemp("safelora")
    base = tiny_base("llama")
    aligned = _dense_aligned(base)
    base.save_pretrained(root / "base")
    aligned.save_pretrained(root / "aligned")
    finetuned = tiny_lora("llama", targets=TARGETS, seed=0)
    finetuned.save_pretrained(root / "adapter")
    return root, base, aligned, finetuned


def _check_against_reference(report, ref: dict, threshold: float | None = None, k: int | None = None) -> set[str]:
    """The report's similarities equal the dense ones (rel 1e-6) and its decisions follow the rule; the projected."""
    got = {m.module: m for m in report.modules}
    assert set(got) == set(ref)
    for module, r in ref.items():
        if r["sim"] is None:
            assert got[module].similarity is None and got[module].note == NO_ALIGNMENT and not got[module].projected
        else:
            assert got[module].similarity == pytest.approx(r["sim"], rel=TOL), module
    defined = sorted((r["sim"], m) for m, r in ref.items() if r["sim"] is not None)
    want = {m for s, m in defined if s <= threshold} if k is None else {m for _, m in defined[:k]}
    assert set(report.projected) == want
    return want


def _check_written(base, folder, ref: dict, projected: set[str]) -> None:
    """PEFT's merged update of the written adapter is C ΔW on projected modules and ΔW elsewhere (rel 1e-6)."""
    deltas = _delta_weights(base, folder)
    assert set(deltas) == set(ref)
    for module, r in ref.items():
        want = r["CdW"] if module in projected else r["dW"]
        assert _rel(deltas[module], want) < TOL, module


def test_folders_match_dense_math_and_peft_loads_the_projection(tiny, tmp_path):
    """From folders: per module similarities (rel 1e-6) and ≤ τ decisions as the dense float64 math gives them, V = 0
    reported and left alone, and the written adapter's PEFT-merged update C ΔW / ΔW (rel 1e-6)."""
    root, base, aligned, finetuned = tiny
    ref = _reference(base, aligned, finetuned)
    sims = sorted(r["sim"] for r in ref.values() if r["sim"] is not None)
    threshold = (sims[1] + sims[2]) / 2  # some projected, some not
    report = apply_safelora(root / "adapter", root / "aligned", root / "base", threshold=threshold, out=tmp_path)
    projected = _check_against_reference(report, ref, threshold=threshold)
    assert 0 < len(projected) < len(ref) - 1
    _check_written(base, tmp_path, ref, projected)
    saved = json.loads((tmp_path / REPORT).read_text())
    assert saved["projected"] == len(projected) and saved["modules_total"] == len(ref)
    assert saved["without_alignment_direction"] == 1 and saved["threshold"] == threshold
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == \
        json.loads((root / "adapter" / "adapter_config.json").read_text())


def test_in_memory_models_and_k_lowest(tiny, tmp_path):
    """From a PeftModel and in-memory models, selecting the k least similar: the same similarities and the k lowest
    projected, the written adapter carrying C B, the caller's models unchanged."""
    _, base, aligned, finetuned = tiny
    ref = _reference(base, aligned, finetuned)
    before = {k: v.clone() for k, v in aligned.state_dict().items()}
    report = apply_safelora(finetuned, aligned, base.state_dict(), num_proj_layers=2, out=tmp_path)
    assert all(torch.equal(before[k], v) for k, v in aligned.state_dict().items())  # the caller's model untouched
    projected = _check_against_reference(report, ref, k=2)
    assert report.threshold is None and report.num_proj_layers == 2
    _check_written(base, tmp_path, ref, projected)


def test_aligned_adapter_is_merged_update(tiny, tmp_path):
    """Aligned given as a LoRA adapter on the base (a `sqsd directions` aligned/): V is its merged update (checked
    against the dense difference of the merged model and the base); modules it does not train have no direction."""
    root, base, _, _ = tiny
    align = _lora_on(base, ("q_proj", "down_proj"), seed=7)
    align.save_pretrained(root / "aligned_adapter")
    merged = copy.deepcopy(align).merge_and_unload()
    finetuned = PeftModel.from_pretrained(copy.deepcopy(base), str(root / "adapter"))
    ref = _reference(base, merged, finetuned)
    assert sum(r["sim"] is None for r in ref.values()) == 2  # the two v_proj
    report = apply_safelora(root / "adapter", root / "aligned_adapter", root / "base", threshold=0.9, out=tmp_path)
    projected = _check_against_reference(report, ref, threshold=0.9)
    assert projected
    _check_written(base, tmp_path, ref, projected)


def test_conv1d_weights_are_transposed(tmp_path):
    """GPT-2's Conv1D layers (weights stored in×out, fan_in_fan_out adapters): V is taken out×in, so similarities
    and the written update match the dense math; the square c_proj would hide a missing transpose in the shapes."""
    base = tiny_base("gpt2")
    aligned = _dense_aligned(base, modules=("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj"))
    finetuned = tiny_lora("gpt2", targets=("c_attn", "c_proj"), seed=0)
    ref = _reference(base, aligned, finetuned)
    report = apply_safelora(finetuned, aligned, base, threshold=1.0, out=tmp_path)
    projected = _check_against_reference(report, ref, threshold=1.0)
    assert len(projected) == 2
    _check_written(base, tmp_path, ref, projected)


def test_cli_writes_a_loadable_adapter(tiny, tmp_path, capsys):
    """`sqsd safelora` end to end: exit 0, the summary printed, an adapter PEFT loads, safelora.json."""
    root, base, aligned, finetuned = tiny
    out = tmp_path / "safe"
    assert main(["safelora", str(root / "adapter"), "--aligned", str(root / "aligned"), "--base", str(root / "base"),
                 "--num-proj-layers", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "projected               3 (the 3 least similar)" in printed and str(out) in printed
    ref = _reference(base, aligned, finetuned)
    saved = json.loads((out / REPORT).read_text())
    projected = {m["module"] for m in saved["modules"] if m["projected"]}
    assert len(projected) == 3
    _check_written(base, out, ref, projected)


def _lora_on(base, targets, seed: int):
    """A LoRA adapter on ``base`` itself with its own random A (seeded) and random nonzero B."""
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape) * 0.3)
    return model


def _save(model, folder):
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case, message", [
    ("dora", "DoRA adapter"),
    ("bias", "trains biases too"),
    ("shape", "pass the models the adapter was trained on"),
    ("missing", "has no weight"),
    ("ia3", "SQSD needs a LoRA adapter"),
    ("k0", "at least 1"),
])
def test_refusals(tiny, tmp_path, case, message):
    """Adapters SafeLoRA cannot project, and models that do not fit the adapter, are refused with the problem named."""
    root, base, aligned, _ = tiny
    adapter, models = root / "adapter", (root / "aligned", root / "base")
    kwargs = {}
    if case in ("dora", "bias"):
        config = LoraConfig(r=4, target_modules=list(TARGETS), **({"use_dora": True} if case == "dora" else
                                                                   {"bias": "all"}))
        adapter = get_peft_model(copy.deepcopy(base), config)  # DoRA in memory, bias='all' from its folder
        adapter = adapter if case == "dora" else _save(adapter, tmp_path / case)
    elif case == "shape":
        wide = tiny_base("llama", hidden=64)
        models = (wide, wide)
    elif case == "missing":
        adapter = _save(tiny_lora("llama", targets=("q_proj", "k_proj")), tmp_path / case)
        narrow = {k: v for k, v in base.state_dict().items() if "k_proj" not in k}
        models = (narrow, narrow)
    elif case == "ia3":
        from peft import IA3Config
        adapter = _save(get_peft_model(copy.deepcopy(base), IA3Config(target_modules=["q_proj"],
                                                                     feedforward_modules=[])), tmp_path / case)
    else:
        kwargs["num_proj_layers"] = 0
    with pytest.raises(ValueError, match=message):
        apply_safelora(adapter, *models, **kwargs)


def test_cli_refusal_exits_1(tiny, tmp_path, capsys):
    """A refusal through the command: exit status 1 and the message on stderr."""
    root, *_ = tiny
    assert main(["safelora", str(root / "adapter"), "--aligned", str(root / "aligned"), "--base",
                 str(root / "aligned_missing"), "--out", str(tmp_path)]) == 1
    assert "sqsd safelora: error:" in capsys.readouterr().err
