"""WaRP's safety mask against independent references: the basis and protected set against an fp64 SVD of the
safety inputs (plain forward hooks) and an autograd importance; every step's θ against a hand-written loop that
projects the dense effective gradient (LoRA: through a zero out×in perturbation whose gradient is G) and then clips
and steps with the Trainer's own optimizer; the logged share removed; resume; 2-process DDP; refusals."""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from sqsd_callback import SQSDCallback, SQSDConfig
from sqsd_callback.layers import LoraTarget, find_targets
from sqsd_callback.policies import SafetyMask
from sqsd_callback.runtime.distributed import Processes
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.tiny import pad_collator, random_samples, three_sets, tiny_full_ft, tiny_lora

from helpers import ThetaEachStep, launch, trainable, trainer
from mask_worker import SAFETY, SAMPLES, TRAIN, run_options

KEEP = 0.5


# ------------------------------------------------------------------ references
def effective_grads(model, loss_of) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``loss_of(model)`` and, per trained module, the gradient G (out×in) w.r.t. its effective weight: LoRA's
    through a zero perturbation E added to the layer (y += x Eᵀ), a Linear's its weight's own (both via .grad)."""
    perturb, handles = {}, []
    for m, t in find_targets(model).items():
        if isinstance(t, LoraTarget):
            layer = model.get_submodule(_peft_name(model, t))
            E = torch.zeros(t.shape, dtype=t.A.dtype, requires_grad=True)
            perturb[m] = E
            handles.append(layer.register_forward_hook(lambda mod, args, out, E=E: out + args[0] @ E.T))
    loss = loss_of(model)
    loss.backward()
    for h in handles:
        h.remove()
    grads = {m: perturb[m].grad if m in perturb else t.module.weight.grad for m, t in find_targets(model).items()}
    return loss, grads


def _peft_name(model, t: LoraTarget) -> str:
    return next(n for n, mod in model.named_modules() if getattr(mod, "lora_A", None) is not None
                and t.lora_A in dict(mod.lora_A).values())


def mean_token_loss(records):
    """The records' loss as the Trainer takes it: Σ token CE / scored tokens (right-padded, one batch)."""

    def loss(model):
        batch = pad_collator()(records)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(),
                                           reduction="sum") / (labels != -100).sum()
    return loss


def reference_projectors(model, records, keep=KEEP) -> dict[str, torch.Tensor]:
    """P = U_M U_Mᵀ per module in fp64: U from the SVD of the stacked safety inputs (non-padding tokens), importance
    Σ_o |(G U)_oj| with G from autograd, the fewest most important directions reaching ``keep``."""
    probe = copy.deepcopy(model).double().eval()
    targets = find_targets(probe)
    inputs = {m: [] for m in targets}
    handles = [(t.lora_A if isinstance(t, LoraTarget) else t.module).register_forward_pre_hook(
        lambda mod, args, m=m: inputs[m].append(args[0].detach())) for m, t in targets.items()]
    batch = pad_collator()(records)
    with torch.no_grad():
        probe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in handles:
        h.remove()
    _, grads = effective_grads(probe, mean_token_loss(records))
    out = {}
    for m in targets:
        X = inputs[m][0][batch["attention_mask"].bool()]
        _, s, Vh = torch.linalg.svd(X, full_matrices=False)
        U = Vh.T[:, s ** 2 > 1e-10 * s[0] ** 2]
        importance = (grads[m].double() @ U).abs().sum(0)
        order = importance.argsort(descending=True)
        share = importance[order].cumsum(0) / importance.sum()
        k = int((share < keep).sum()) + 1
        out[m] = U[:, order[:k]] @ U[:, order[:k]].T
    return out


def assert_masked_steps(model, samples, rows, out, thetas: ThetaEachStep, P: dict[str, torch.Tensor], logged=None,
                        steps=3, max_grad_norm=0.05, lr=0.05, accum=2, **kw) -> None:
    """θ after every step equals a hand-written loop's: loss = Σ token CE over the step's kept examples / their
    scored tokens, the dense effective gradient G projected G(I − P) (LoRA: gA = s Bᵀ G', gB = s G' Aᵀ), clipped,
    one step of the Trainer's own optimizer and scheduler. Tolerance 1e-3 × lr (AdamW moves each weight by about
    lr). ``logged``: the run's sqsd/mask_removed per step, equal to ‖g − g'‖²/‖g‖² here (rel 1e-4)."""
    ref = trainer(model, samples, out, max_grad_norm=max_grad_norm, lr=lr, steps=steps, accum=accum, **kw)
    ref.create_optimizer_and_scheduler(num_training_steps=steps)
    params = [p for p in model.parameters() if p.requires_grad]
    targets = find_targets(model)
    model.train()
    for s in range(steps):
        kept = [samples[r["index"]] for r in rows if r["step"] == s and not r["dropped"]]
        _, G = effective_grads(model, mean_token_loss(kept))
        removed = whole = 0.0
        with torch.no_grad():
            for m, t in targets.items():
                masked = G[m].double() @ (torch.eye(G[m].shape[1], dtype=torch.float64) - P[m])
                if isinstance(t, LoraTarget):
                    A, B = t.A.double(), t.B.double()
                    new = [t.scaling * B.T @ masked, t.scaling * masked @ A.T]
                    old = [t.A.grad, t.B.grad]
                else:
                    new, old = [masked], [t.module.weight.grad]
                for g, n in zip(old, new):
                    removed += float((g.double() - n).pow(2).sum())
                    whole += float(g.double().pow(2).sum())
                    g.copy_(n)
        if logged is not None:
            assert abs(logged[s] - removed / whole) <= 1e-4 * removed / whole, (s, logged[s], removed / whole)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        ref.optimizer.step()
        ref.lr_scheduler.step()
        ref.optimizer.zero_grad()
        got, want = thetas.theta[s + 1], trainable(model)
        moved = max((want[n] - thetas.theta[s][n]).abs().max().item() for n in got)
        err = max((got[n] - want[n]).abs().max().item() for n in got)
        assert err < 1e-3 * lr < moved, f"step {s}: |θ − reference| = {err:.3g}, the step moved θ by {moved:.3g}"
        print(f"mask step {s}: |θ − reference| = {err:.2e} (moved {moved:.2e})")


def projectors(mask: SafetyMask) -> dict[str, torch.Tensor]:
    return {m: (U.double() @ U.double().T) for m, U in mask.basis.items()}


def assert_projectors_equal(got: dict, want: dict, tol: float = 1e-4) -> None:
    """Same protected subspaces: equal k and ‖P − P_ref‖_F < tol (fp32 activations against fp64: the subspace moves
    by their rounding over the eigengaps, ~1e-5 here)."""
    assert got.keys() == want.keys()
    for m in want:
        k = int(round(float(torch.trace(want[m]))))
        assert int(round(float(torch.trace(got[m])))) == k, m
        assert 0 < k < want[m].shape[0], (m, k)  # a real choice: some directions protected, some not
        assert float((got[m] - want[m]).norm()) < tol, (m, float((got[m] - want[m]).norm()))


# ------------------------------------------------------------------ every step
MODELS = {"lora": lambda: tiny_lora("llama"), "full_ft": lambda: tiny_full_ft("llama")}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("drops", [False, True], ids=["mask", "mask+drops"])
def test_every_masked_step_equals_the_dense_reference(tmp_path, kind, drops):
    model = MODELS[kind]()
    start = copy.deepcopy(model)
    danger, safety = three_sets(model)
    thetas = ThetaEachStep()
    options = dict(drop_top_fraction=0.25) if drops else {}
    cb = SQSDCallback(danger, safety, mask=SAFETY, mask_keep=KEEP, **options)
    run = trainer(model, SAMPLES, tmp_path / "run", [cb, thetas], **TRAIN)
    run.train()
    mask = next(p for p in cb.policies if isinstance(p, SafetyMask))
    P = reference_projectors(start, SAFETY)
    assert_projectors_equal(projectors(mask), P)
    rows = read_jsonl(tmp_path / "run" / "sqsd" / "scores.jsonl")
    assert any(r["dropped"] for r in rows) == drops
    logged = [h["sqsd/mask_removed"] for h in run.state.log_history if "loss" in h]
    assert len(logged) == TRAIN["steps"] and all(0 < v < 1 for v in logged)
    assert_masked_steps(start, SAMPLES, rows, tmp_path / "ref", thetas, P, logged=logged, **TRAIN)


def test_masked_steps_under_gradient_checkpointing_equal_the_reference(tmp_path):
    """The LoRA taps under non-reentrant checkpointing (the saved x̃ U_M is freed and recomputed)."""
    model = tiny_lora("llama")
    start = copy.deepcopy(model)
    thetas = ThetaEachStep()
    cb = SQSDCallback(*three_sets(model), mask=SAFETY, mask_keep=KEEP)
    trainer(model, SAMPLES, tmp_path / "run", [cb, thetas], **TRAIN, gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False}).train()
    rows = read_jsonl(tmp_path / "run" / "sqsd" / "scores.jsonl")
    assert_masked_steps(start, SAMPLES, rows, tmp_path / "ref", thetas, reference_projectors(start, SAFETY), **TRAIN)


def test_building_leaves_the_model_as_found(tmp_path):
    model = tiny_lora("llama", dropout=0.1)
    model.train()
    before = trainable(model)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    cb = SQSDCallback(mask=SAFETY, mask_keep=KEEP)
    run = trainer(model, SAMPLES, tmp_path, [cb], **TRAIN)
    cb.on_train_begin(run.args, run.state, run.control, model=model, train_dataloader=run.get_train_dataloader())
    mask = cb.policies[0]
    assert mask.basis and all(m.training for m in model.modules())
    assert all(torch.equal(p, before[n]) and torch.equal(p.grad, torch.ones_like(p))
               for n, p in model.named_parameters() if p.requires_grad)
    cb.run.recorder.detach()


def test_mask_alone_without_direction_sets_trains_masked(tmp_path):
    model = tiny_lora("llama")
    thetas = ThetaEachStep()
    cb = SQSDCallback(mask=SAFETY, mask_keep=KEEP, mask_modules=["down_proj"], mask_rank=3)
    run = trainer(model, SAMPLES, tmp_path / "run", [cb, thetas], **TRAIN)
    run.train()
    mask = cb.policies[0]
    assert sorted(mask.basis) == [m for m in sorted(find_targets(model)) if "down_proj" in m]
    assert all(0 < U.shape[1] <= 3 for U in mask.basis.values())
    assert not all(torch.equal(p, thetas.theta[0][n]) for n, p in trainable(model).items())  # it trained
    assert len({h["sqsd/mask_removed"] for h in run.state.log_history if "loss" in h}) == TRAIN["steps"]


# ------------------------------------------------------------------ resume
def test_resume_restores_the_mask_without_rebuilding(tmp_path, monkeypatch):
    def run(model, cb, out):
        return trainer(model, SAMPLES, out, [cb], **{**TRAIN, "steps": 4}, save_strategy="steps", save_steps=2)

    first_cb = SQSDCallback(*three_sets(tiny_lora("llama")), mask=SAFETY, mask_keep=KEEP)
    first = run(tiny_lora("llama"), first_cb, tmp_path)
    first.train()
    want = trainable(first.model)
    monkeypatch.setattr(SafetyMask, "build", lambda self, model: pytest.fail("the resumed run rebuilt the mask"))
    model = tiny_lora("llama")
    cb = SQSDCallback(*three_sets(model), mask=SAFETY, mask_keep=KEEP)
    again = run(model, cb, tmp_path)
    again.train(resume_from_checkpoint=str(Path(tmp_path) / "checkpoint-2"))
    first_mask, mask = first_cb.policies[0], cb.policies[0]
    assert all(torch.equal(mask.basis[m], first_mask.basis[m]) for m in first_mask.basis)
    got = trainable(model)
    assert max(float((got[n] - want[n]).abs().max()) for n in want) < 1e-3 * 0.05


# ------------------------------------------------------------------ DDP
@pytest.mark.distributed
def test_two_process_ddp_equals_the_single_process_reference(tmp_path):
    launch(Path(__file__).with_name("mask_worker.py"), tmp_path)
    for name, options in run_options().items():
        out = tmp_path / name
        thetas = ThetaEachStep()
        thetas.theta = torch.load(out / "thetas.pt")
        basis = torch.load(out / "basis.pt")
        rows = read_jsonl(out / "sqsd" / "scores.jsonl")
        assert any(r["dropped"] for r in rows) == ("drop_top_fraction" in options)
        model = tiny_lora("llama")
        P = reference_projectors(model, SAFETY)
        assert_projectors_equal({m: U.double() @ U.double().T for m, U in basis.items()}, P)
        logged = json.loads((out / "removed.json").read_text())
        assert_masked_steps(model, SAMPLES, rows, tmp_path / f"ref-{name}", thetas, P, logged=logged, **TRAIN)


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("procs,message", [
    (Processes(2, 0, "fsdp", fsdp_version=2), "safety mask edits whole gradients.*fsdp"),
    (Processes(2, 0, "deepspeed", zero_stage=2), "under DeepSpeed they are not supported"),
])
def test_sharded_backends_are_refused_before_the_first_step(tmp_path, monkeypatch, procs, message):
    model = tiny_lora("llama")
    monkeypatch.setattr(Processes, "current", classmethod(lambda cls: procs))
    before = trainable(model)
    run = trainer(model, SAMPLES, tmp_path, [SQSDCallback(mask=SAFETY)], **TRAIN)
    with pytest.raises(ValueError, match=message):
        run.train()
    assert run.state.global_step == 0 and all(torch.equal(p, before[n]) for n, p in trainable(model).items())


@pytest.mark.parametrize("options,error,message", [
    (dict(mask_keep=1.0), ValueError, r"mask_keep must be in \(0, 1\)"),
    (dict(mask_keep=0), ValueError, r"mask_keep must be in \(0, 1\)"),
    (dict(mask_rank=0), ValueError, "mask_rank must be at least 1"),
    (dict(mask_modules="down_proj"), TypeError, "mask_modules must be a list"),
    (dict(mask_batch_size=0), ValueError, "mask_batch_size must be at least 1"),
])
def test_bad_mask_options_fail_when_built(options, error, message):
    with pytest.raises(error, match=message):
        SQSDConfig(**options)


def test_mask_options_without_records_and_bad_records_fail():
    with pytest.raises(ValueError, match=r"mask_keep=0.3 needs mask=\[...\]"):
        SQSDCallback(*three_sets(tiny_lora("llama")), mask_keep=0.3)
    with pytest.raises(ValueError, match="only engine='hooks'"):
        SQSDCallback(*three_sets(tiny_lora("llama")), mask=SAFETY, engine="vmap")
    with pytest.raises(ValueError, match="mask= needs safety records"):
        SQSDCallback(mask=[{"input_ids": [1, 2]}])


def test_unknown_mask_modules_fail_at_train_begin(tmp_path):
    run = trainer(tiny_lora("llama"), SAMPLES, tmp_path, [SQSDCallback(mask=SAFETY, mask_modules=["gate"])],
                  **TRAIN)
    with pytest.raises(ValueError, match=r"mask_modules=\['gate'\] names none of the trained modules"):
        run.train()


def test_config_round_trips_mask_options():
    cfg = SQSDConfig(mask_keep=0.7, mask_rank=2, mask_modules=["mlp.down_proj"], mask_batch_size=4)
    assert SQSDConfig.from_yaml(cfg.to_yaml()) == cfg == SQSDConfig.from_json(cfg.to_json())


def test_the_taps_come_off_when_training_ends(tmp_path):
    """After train() no LoRA module keeps a hook of the mask's: later passes (evaluation, generation) reach none."""
    model = tiny_lora("llama")
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    cb = SQSDCallback(*three_sets(model), mask=random_samples(4, seed=8))
    trainer(model, random_samples(8, seed=1), tmp_path, [cb], steps=1).train()
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert after == before
