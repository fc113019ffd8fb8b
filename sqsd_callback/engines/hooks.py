"""Per-example scores from the step's own backward pass, never forming a per-example out×in gradient.

A tap on a layer's output receives the layer's input, saved the way the layer saves it (so gradient
checkpointing frees and recomputes it), and its output gradient. One scorer per layer type does the math:

LoRA (taps on ``lora_B`` then ``lora_A``, in backward order), with ΔW_i = −s(gB_i A + B gA_i):
    <ΔW_i, V> = −s(<gB_i, V Aᵀ> + <gA_i, Bᵀ V>)
    ‖ΔW_i‖²  = s²(<gB_iᵀgB_i, AAᵀ> + <gA_i gA_iᵀ, BᵀB> + 2<Bᵀ gB_i, gA_i Aᵀ>)
where gB_i (out×r) and gA_i (r×in) are the example's LoRA factor gradients, summed over its tokens.

Full fine-tuning (one tap per Linear), with ΔW_i = −G_i = −Σ_t δ_t x_tᵀ:
    <ΔW_i, V> = −Σ_t (δ_tᵀ B_V)(A_V x_t)   (low-rank V; dense V: −Σ_t δ_tᵀ V x_t)
    ‖ΔW_i‖²  = Σ_{t,s} (x_t·x_s)(δ_t·δ_s)   (ghost norm, when 2T² ≤ in·out; else ‖G_i‖² from G_i)
"""

from __future__ import annotations

import torch
from torch import nn

from ..directions import DirectionBank
from ..modules import LinearTarget, LoraTarget, Target
from .base import Batch, Stats, example_mean_losses, scoring_mode


class _Tap(torch.autograd.Function):
    """Identity on ``out`` whose backward hands ``(inp, grad_out)`` to ``fn``."""

    @staticmethod
    def forward(ctx, inp, out, fn):
        ctx.save_for_backward(inp)
        ctx.fn = fn
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        (inp,) = ctx.saved_tensors
        ctx.fn(inp, grad)
        return None, grad, None


class _LoraScorer:
    """One LoRA module. Products of the current factors with the directions are cached and recomputed when
    the factors change (keyed by their in-place version counters, so once per optimizer step)."""

    def __init__(self, engine: HooksEngine, target: LoraTarget, dirs: list | None, slot: int | None) -> None:
        self.engine, self.target, self.dirs, self.slot, self.key = engine, target, dirs, slot, None
        self.partial = self.kept = None

    def taps(self):
        return [(self.target.lora_B, self.backward_B), (self.target.lora_A, self.backward_A)]

    def algebra(self):
        A, B = self.target.A, self.target.B
        key = (A._version, B._version, A.data_ptr(), B.data_ptr())
        if key != self.key:
            with torch.no_grad():
                A32, B32 = A.detach().float(), B.detach().float()
                zB, zA = torch.zeros_like(B32), torch.zeros_like(A32)
                M1 = torch.stack([zB if d is None else d.times_right(A32.T) for d in self.dirs])  # K×out×r
                M2 = torch.stack([zA if d is None else d.times_left(B32.T) for d in self.dirs])   # K×r×in
                self.value = (M1, M2, A32 @ A32.T, B32.T @ B32, A32, B32)
            self.key = key
        return self.value

    def backward_B(self, h: torch.Tensor, dB: torch.Tensor) -> None:
        """lora_B's input h (…×r) and output gradient δB (…×out): keep what the lora_A step needs."""
        gB = self.engine.per_example(dB, h)
        if self.engine.keep_grads:
            self.kept = [None, gB]
        if self.slot is not None:
            M1, _, _, _, _, B = self.algebra()
            self.partial = (torch.einsum("bor,kor->bk", gB, M1), B.T @ gB, gB.transpose(1, 2) @ gB)

    def backward_A(self, x: torch.Tensor, dA: torch.Tensor) -> None:
        """lora_A's input x (…×in) and output gradient δA (…×r): finish the module for every example."""
        gA = self.engine.per_example(dA, x)
        if self.engine.keep_grads and self.kept is not None:
            self.kept[0] = gA
        if self.slot is None or self.partial is None:
            return
        _, M2, AAt, BtB, A, _ = self.algebra()
        (dot_B, BtgB, gram_B), self.partial = self.partial, None
        s, rec = self.target.scaling, self.engine.record
        rec.dots[:, self.slot] += -s * (dot_B + torch.einsum("bri,kri->bk", gA, M2))
        gram_A, gAAt = gA @ gA.transpose(1, 2), gA @ A.T
        rec.sq[:, self.slot] += s * s * ((gram_B * AAt).sum((1, 2)) + (gram_A * BtB).sum((1, 2))
                                         + 2 * (BtgB * gAAt).sum((1, 2)))

    def removed(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """The summed gradients of examples ``idx`` for (A, B)."""
        return [g.index_select(0, idx).sum(0) for g in self.kept]


class _LinearScorer:
    """One fully trained Linear."""

    def __init__(self, engine: HooksEngine, target: LinearTarget, dirs: list | None, slot: int | None) -> None:
        self.engine, self.target, self.dirs, self.slot, self.kept = engine, target, dirs, slot, None

    def taps(self):
        return [(self.target.module, self.backward)]

    def backward(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        x, delta = self.engine.split(x), self.engine.split(delta)
        if self.engine.keep_grads:
            self.kept = (x, delta)
        if self.slot is None:
            return
        rec = self.engine.record
        for k, d in enumerate(self.dirs):
            if d is None:
                continue
            if d.dense is not None:
                rec.dots[:, self.slot, k] -= (delta * (x @ d.dense.T)).sum((1, 2))
            else:
                rec.dots[:, self.slot, k] -= ((delta @ d.B) * (x @ d.A.T)).sum((1, 2))
        T, (out, inp) = x.shape[1], self.target.shape
        if 2 * T * T <= inp * out:
            rec.sq[:, self.slot] += ((x @ x.transpose(1, 2)) * (delta @ delta.transpose(1, 2))).sum((1, 2))
        else:
            rec.sq[:, self.slot] += torch.bmm(delta.transpose(1, 2), x).pow(2).sum((1, 2))

    def removed(self, idx: torch.Tensor) -> list[torch.Tensor]:
        x, delta = (t.index_select(0, idx) for t in self.kept)
        return [torch.einsum("nto,nti->oi", delta, x)]


SCORERS = {LoraTarget: _LoraScorer, LinearTarget: _LinearScorer}


class HooksEngine:
    """Scores every example of each forward/backward pass the model runs while attached.

    With ``keep_grads`` it also keeps, for every target (not only those with directions), what it needs to
    give any examples' summed gradients afterwards (``removed``): what exact removal from the update needs.
    """

    name = "hooks"

    def __init__(self, targets: dict[str, Target], bank: DirectionBank, keep_grads: bool = False) -> None:
        self.targets, self.bank, self.keep_grads = targets, bank, keep_grads
        slot = {m: j for j, m in enumerate(bank.modules)}
        names = targets if keep_grads else bank.modules
        self.scorers = {m: SCORERS[type(targets[m])](self, targets[m], bank.per_module.get(m), slot.get(m))
                        for m in names}
        self.handles: list = []
        self.record: Stats | None = None
        self.segments = None

    # -------------------------------------------------------------- lifecycle
    def attach(self) -> None:
        if self.handles:
            return
        for scorer in self.scorers.values():
            for module, fn in scorer.taps():
                self.handles.append(module.register_forward_hook(self._tap(fn)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def start(self, n_examples: int, device, segments=None) -> None:
        """Open a record for the next pass over ``n_examples`` examples: one per row, or where ``segments``
        (a packed batch's :class:`Segments`) say."""
        K, M = len(self.bank.sets), len(self.bank.modules)
        self.record = Stats(torch.zeros(n_examples, M, K, device=device), torch.zeros(n_examples, M, device=device))
        self.segments = segments
        for scorer in self.scorers.values():
            scorer.kept = None

    def finish(self) -> Stats:
        """Close the current record and return it."""
        record, self.record = self.record, None
        return record

    def removed(self, idx: torch.Tensor):
        """For each target, its parameters paired with the summed gradients of examples ``idx`` of the last pass
        (``keep_grads`` only); the kept tensors are released."""
        for m, scorer in self.scorers.items():
            if scorer.kept is not None:
                yield from zip(self.targets[m].params, scorer.removed(idx))
            scorer.kept = None

    def _tap(self, fn):
        def hook(module, args, out):
            if self.record is None or not torch.is_grad_enabled() or not out.requires_grad:
                return None
            return _Tap.apply(args[0], out, lambda inp, grad: self.record is not None and fn(inp, grad))
        return hook

    def split(self, t: torch.Tensor) -> torch.Tensor:
        """Activations (rows × length × d) as (examples × tokens × d), fp32."""
        if self.segments is not None:
            return self.segments.split(t.float())
        return t.reshape(self.record.sq.shape[0], -1, t.shape[-1]).float()

    def per_example(self, grad: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        """Σ over each example's tokens of grad_t inp_tᵀ: (n × grad-dim × inp-dim), fp32."""
        return torch.bmm(self.split(grad).transpose(1, 2), self.split(inp))

    # -------------------------------------------------------------- offline
    def compute(self, model: nn.Module, batch: Batch) -> Stats:
        """One batched forward/backward at the current parameters; each example's loss is its own mean, so the
        result equals the batch-size-1 reference."""
        was_attached = bool(self.handles)
        self.attach()
        try:
            with scoring_mode(model, self.targets) as params:
                self.start(batch.input_ids.shape[0], batch.input_ids.device)
                logits = model(**batch.model_inputs()).logits
                loss = example_mean_losses(logits, batch.labels).sum()
                torch.autograd.grad(loss, params, allow_unused=True)
                return self.finish()
        finally:
            self.record = None
            if not was_attached:
                self.detach()
