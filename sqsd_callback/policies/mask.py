"""WaRP's safety mask (Safety-WaRP, after Kim et al.'s Weight space Rotation Process): every step's gradient loses
its components along the input directions the safety behaviour relies on most.

Built once at θ_0, before step 1, from safety records, for each masked module (weight out×in, input x):
    U      eigenvectors of C = Σ_t x_t x_tᵀ over the records' tokens (the right singular vectors of the stacked
           inputs X), those with eigenvalue > 1e-10 × the largest
    imp_j  Σ_o |(G U)_oj|, G = ∂L/∂W (out×in) of the records' mean token loss: WaRP's importance |∂L/∂coefficient|
           of the weight in the rotated basis, summed over the coefficients of direction j
    U_M    the fewest most important directions whose importance reaches ``keep`` of the module's total (≤ ``rank``)
Each step, once its gradients are complete (under DDP, averaged) and before clipping, with P = U_M U_Mᵀ:
    full fine-tuning   g ← g (I − P)
    LoRA, ΔW = s B A   the effective gradient G ← G (I − P), exactly on the factors (gA = s BᵀG, gB = s G Aᵀ):
                       gA ← gA (I − P),  gB ← gB − H (A U_M)ᵀ,  H = s G U_M = Σ_t (∂L/∂z_t)(x̃_tᵀ U_M)
                       with x̃ lora_A's input and z lora_B's output: H (out×k) is summed by a tap in the backward.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn

from ..engines.hooks import _Tap
from ..layers import LinearTarget, LoraTarget
from .base import Policy, RunContext

EIGEN_FLOOR = 1e-10
"""Eigenvalues of C below this share of the largest span no input direction (rank-deficient X)."""


class SafetyMask(Policy):
    """Remove from each step's gradient its components along the ``keep`` share of importance of each module's
    safety input directions (at most ``rank`` of them per module), in ``modules`` (names containing one of these
    strings; None: every trained module), from ``records`` (dicts with ``input_ids`` and ``labels``, −100 unscored)
    run ``batch_size`` at a time; with ``drops`` the dropped examples' share is left out as the drops leave it."""

    name = tensors_key = "mask"
    settings = ("keep", "rank", "modules", "batch_size")
    edits_gradients = True

    def __init__(self, records: Iterable[dict], keep: float = 0.9, rank: int | None = None,
                 modules: list[str] | None = None, batch_size: int = 8, drops: bool = False) -> None:
        self.records = [dict(r) for r in records]
        if not self.records or not all("input_ids" in r and "labels" in r for r in self.records):
            raise ValueError("mask= needs safety records: a non-empty list of dicts with input_ids and labels (-100 "
                             "marks tokens the safety loss leaves out), e.g. tokenized refusals to harmful prompts.")
        self.keep, self.rank, self.modules, self.batch_size, self.drops = keep, rank, modules, batch_size, drops
        self.basis: dict[str, torch.Tensor] | None = None
        self.removed: float | None = None
        self._handles: list = []

    def describe(self) -> dict:
        return {**super().describe(), "records": len(self.records)}

    # ------------------------------------------------------------------ the run
    def bind(self, run: RunContext) -> None:
        """Build U_M at θ_0 (a resumed run restores it from the checkpoint) and tap the LoRA layers."""
        if run.procs.backend in ("fsdp", "deepspeed"):
            raise ValueError(f"The safety mask edits whole gradients after the step's reduction, which "
                             f"{run.procs.backend} shards or steps inside its own call; train with DDP or one "
                             f"process, or without mask=.")
        chosen = {m: t for m, t in run.targets.items() if self.modules is None or any(s in m for s in self.modules)}
        if not chosen:
            raise ValueError(f"mask_modules={self.modules} names none of the trained modules (e.g. "
                             f"{sorted(run.targets)[:3]}); pass parts of their names, e.g. ['mlp.down_proj'].")
        odd = [m for m, t in chosen.items() if not isinstance(t, (LoraTarget, LinearTarget))]
        if odd:
            raise ValueError(f"The safety mask handles LoRA and Linear layers, not {odd[:3]}; leave them out with "
                             f"mask_modules.")
        self.on_train_end()  # a second run's taps replace the first's
        self.run, self.targets, self.removed = run, chosen, None
        self._H: dict[str, torch.Tensor] = {}
        self._per_example: dict[str, torch.Tensor] = {}
        self._inputs: dict[str, torch.Tensor] = {}
        if run.fresh:  # every rank masks with rank 0's basis
            self.basis = run.procs.gather([{m: u.cpu() for m, u in self.build(run.model).items()}])[0]
            self.basis = {m: u.to(run.targets[m].params[0].device) for m, u in self.basis.items()}
        else:
            self.basis = None  # load_state_tensors restores it
        self._handles = [h for m, t in chosen.items() if isinstance(t, LoraTarget)
                         for h in (t.lora_A.register_forward_pre_hook(partial(self._keep_input, m)),
                                   t.lora_B.register_forward_hook(partial(self._tap, m)))]

    def on_train_end(self) -> None:
        """Take the LoRA taps off: passes after training reach no mask."""
        for h in self._handles:
            h.remove()
        self._handles, self._inputs = [], {}

    def _keep_input(self, m: str, module: nn.Module, args: tuple) -> None:
        self._inputs[m] = args[0]

    def _tap(self, m: str, module: nn.Module, args: tuple, out: torch.Tensor):
        x = self._inputs.pop(m, None)
        if x is None or not (torch.is_grad_enabled() and out.requires_grad):
            return None
        if self.basis is None:
            raise RuntimeError("The resumed checkpoint holds no safety mask (it was saved by a run without mask=); "
                               "resume from a checkpoint of this run, or start the run afresh.")
        U = self.basis[m]
        if U.shape[1] == 0:
            return None
        return _Tap.apply(out, partial(self._backward, m), x.detach().to(U.dtype) @ U)

    def _backward(self, m: str, xU: torch.Tensor, dz: torch.Tensor) -> None:
        """H += Σ_t dz_t (x̃_tᵀ U_M); per example while drops may remove some of them."""
        if self.drops:
            tokens = self.run.engine.tokens
            self._per_example[m] = torch.bmm(tokens(dz).transpose(1, 2), tokens(xU))
            return
        H = dz.reshape(-1, dz.shape[-1]).float().T @ xU.reshape(-1, xU.shape[-1])
        self._H[m] = self._H[m] + H if m in self._H else H

    def on_micro_batch(self, mb) -> None:
        if not self._per_example:
            return
        kept = torch.tensor([not r.get("dropped", False) for r in mb.rows])
        for m, H in self._per_example.items():
            H = H[kept.to(H.device)].sum(0)
            self._H[m] = self._H[m] + H if m in self._H else H
        self._per_example = {}

    def on_step_complete(self, step) -> None:
        """g ← g(I − P) (LoRA: on the effective gradient, through gA and gB), after DDP's averaging."""
        names = [m for m, U in self.basis.items() if isinstance(self.targets[m], LoraTarget) and U.shape[1]]
        device = self.run.params[0].device
        counts = _token_counts(step) if self.drops else torch.zeros(2)
        own = [self._H.get(m, torch.zeros(self.targets[m].shape[0], self.basis[m].shape[1], device=device))
               for m in names]  # every rank the same list, whichever layers its micro-batches ran
        summed = self.run.procs.sum([*own, counts.to(device)])
        self._H = {}
        total, kept = (float(c) for c in summed[-1])
        scale = (total / kept if kept else 0.0) if self.drops else 1.0  # the drops' renormalisation
        H = {m: h * (scale / self.run.procs.world) for m, h in zip(names, summed[:-1])}
        removed = whole = 0.0
        with torch.no_grad():
            for m, U in self.basis.items():
                t = self.targets[m]
                if isinstance(t, LoraTarget):
                    if t.A.grad is None or t.B.grad is None or m not in H:  # skipped step, or k = 0
                        continue
                    grads = (t.A.grad, t.B.grad)
                    edits = ((t.A.grad.float() @ U) @ U.T, H[m] @ (t.A.float() @ U).T)
                else:
                    if t.module.weight.grad is None:
                        continue
                    grads = (t.oriented(t.module.weight.grad),)
                    edits = ((grads[0].float() @ U) @ U.T,)
                for g, e in zip(grads, edits):  # summed on the device: one sync per step
                    removed = removed + e.pow(2).sum()
                    whole = whole + g.float().pow(2).sum()
                    g.sub_(e.to(g.dtype))
        self.removed = float(removed / whole) if float(whole) else 0.0

    def scalars(self) -> dict[str, float]:
        return {} if self.removed is None else {"sqsd/mask_removed": self.removed}

    # ------------------------------------------------------------ the basis
    def build(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """U_M (in×k) per module from the safety records at the model's current parameters, in eval mode; the
        parameters, their ``.grad`` and the modules' train/eval modes are left as found."""
        modes = [(mod, mod.training) for mod in model.modules()]
        model.eval()
        try:
            cov = self._pass(model, None)
            bases: dict[str, torch.Tensor] = {}
            for m, C in cov.items():  # modules reading one input (q, k, v; gate, up) share one eigendecomposition
                same = next((u for n, u in bases.items() if torch.equal(cov[n], C)), None)
                if same is None:
                    vals, vecs = torch.linalg.eigh(C)
                    same = vecs[:, vals > EIGEN_FLOOR * vals.max()].flip(1)
                bases[m] = same
            GU = self._pass(model, bases)
        finally:
            for mod, training in modes:
                mod.training = training
        return {m: self.select(bases[m], GU[m]).float() for m in bases}

    def select(self, U: torch.Tensor, GU: torch.Tensor) -> torch.Tensor:
        """The columns of U whose importance Σ_o |(G U)_oj| is largest, the fewest reaching ``keep`` of the total."""
        importance = GU.abs().sum(0)
        order = importance.argsort(descending=True)
        cumulative = importance[order].cumsum(0)
        k = 0 if cumulative[-1] == 0 else int((cumulative < self.keep * cumulative[-1]).sum()) + 1
        return U[:, order[:min(k, self.rank or k)]]

    def _pass(self, model: nn.Module, bases: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Over the records: C = Σ_t x_t x_tᵀ per module (``bases`` None), else G U (fp64, G of the mean loss)."""
        seen: dict[str, list] = {m: [] for m in self.targets}
        handles = []
        for m, t in self.targets.items():
            first, last = (t.lora_A, t.lora_B) if isinstance(t, LoraTarget) else (t.module, t.module)
            handles.append(first.register_forward_pre_hook(lambda mod, args, m=m: seen[m].append([args[0]])))
            handles.append(last.register_forward_hook(lambda mod, args, out, m=m: seen[m][-1].append(out)))
        device = self.run.params[0].device
        n_scored = sum(int((torch.as_tensor(r["labels"])[1:] != -100).sum()) for r in self.records)
        out: dict[str, torch.Tensor] = {}
        try:
            for i in range(0, len(self.records), self.batch_size):
                ids, mask, labels = _collate(self.records[i:i + self.batch_size], device)
                for got in seen.values():
                    got.clear()
                with torch.set_grad_enabled(bases is not None):
                    logits = model(input_ids=ids, attention_mask=mask).logits
                    if bases is not None:
                        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                           labels[:, 1:].flatten(), reduction="sum") / n_scored
                        outs = [o for m in self.targets for _, o in seen[m]]
                        grads = iter(torch.autograd.grad(loss, outs))
                for m, t in self.targets.items():
                    for x, _ in seen[m]:
                        x = x.detach().double()
                        if bases is None:
                            x = x[mask.bool()]
                            part = x.T @ x
                        else:
                            dz = next(grads).double()
                            scaling = t.scaling if isinstance(t, LoraTarget) else 1.0
                            part = dz.flatten(0, -2).T @ (x.flatten(0, -2) @ bases[m]) / scaling
                        out[m] = out[m] + part if m in out else part
        finally:
            for h in handles:
                h.remove()
        return out

    # ---------------------------------------------------------- checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.basis or {})

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            self.basis = {m: u.to(self.targets[m].params[0].device) for m, u in tensors.items()}


def _token_counts(step) -> torch.Tensor:
    """The step's scored tokens and those the drops kept (this process's micro-batches)."""
    scored = [mb for mb in step if mb.rows is not None]
    return torch.tensor([sum(int(mb.batch.n_scored.sum()) for mb in scored),
                         sum(mb.kept_tokens for mb in scored)], dtype=torch.float32)


def _collate(records: list[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (−100 on padding)."""
    width = max(len(r["input_ids"]) for r in records)
    ids = torch.zeros(len(records), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(records):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        labels[i, :n] = torch.as_tensor(r["labels"])
        mask[i, :n] = torch.as_tensor(r["attention_mask"]) if "attention_mask" in r else 1
    return ids.to(device), mask.to(device), labels.to(device)
