"""Per-example scores from the step's own backward pass, never forming a per-example out×in gradient.

A tap on the output of each LoRA factor (``lora_B``, then ``lora_A`` in backward order) receives the factor's
input, saved the way the layer saves it (so gradient checkpointing frees and recomputes it), and its output
gradient. Per example i, with ΔW_i = −s(gB_i A + B gA_i):

    <ΔW_i, V> = −s(<gB_i, V Aᵀ> + <gA_i, Bᵀ V>)
    ‖ΔW_i‖²  = s²(<gB_iᵀgB_i, AAᵀ> + <gA_i gA_iᵀ, BᵀB> + 2<Bᵀ gB_i, gA_i Aᵀ>)

where gB_i (out×r) and gA_i (r×in) are the example's LoRA factor gradients, summed over its tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from ..directions import DirectionBank
from ..modules import LoraTarget
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


class _Algebra:
    """Per-module products of the current LoRA factors with the directions, recomputed when the factors change
    (keyed by their in-place version counters, so once per optimizer step)."""

    def __init__(self, target: LoraTarget, dirs: list) -> None:
        self.target, self.dirs, self.key = target, dirs, None

    def get(self):
        A, B = self.target.A, self.target.B
        key = (A._version, B._version, A.data_ptr(), B.data_ptr())
        if key != self.key:
            with torch.no_grad():
                A32, B32 = A.detach().float(), B.detach().float()
                zB = torch.zeros(B32.shape, device=B32.device)
                zA = torch.zeros(A32.shape, device=A32.device)
                M1 = torch.stack([zB if d is None else d.times_right(A32.T) for d in self.dirs])  # K×out×r
                M2 = torch.stack([zA if d is None else d.times_left(B32.T) for d in self.dirs])   # K×r×in
                self.value = (M1, M2, A32 @ A32.T, B32.T @ B32, A32, B32)
            self.key = key
        return self.value


class HooksEngine:
    """Scores every example of each forward/backward pass the model runs while attached.

    With ``keep_grads`` it also keeps every example's LoRA factor gradients ``(gA_i, gB_i)`` for every LoRA
    module (``self.grads``, fp32, per pass): what exact removal of an example from the update needs.
    """

    name = "hooks"

    def __init__(self, targets: dict[str, LoraTarget], bank: DirectionBank, keep_grads: bool = False) -> None:
        self.targets, self.bank, self.keep_grads = targets, bank, keep_grads
        self.algebra = [_Algebra(targets[m], bank.per_module[m]) for m in bank.modules]
        slot = {m: j for j, m in enumerate(bank.modules)}
        self.tapped = [(m, slot.get(m)) for m in (targets if keep_grads else bank.modules)]
        self.handles: list = []
        self.record: Stats | None = None
        self.grads: dict[str, list] = {}
        self._partial: dict[int, tuple] = {}

    # -------------------------------------------------------------- lifecycle
    def attach(self) -> None:
        if self.handles:
            return
        for m, j in self.tapped:
            t = self.targets[m]
            self.handles.append(t.lora_B.register_forward_hook(self._tap(self._backward_B, m, j)))
            self.handles.append(t.lora_A.register_forward_hook(self._tap(self._backward_A, m, j)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def start(self, n_examples: int, device) -> None:
        """Open a record for the next pass over ``n_examples`` rows."""
        K, M = len(self.bank.sets), len(self.bank.modules)
        self.record = Stats(torch.zeros(n_examples, M, K, device=device), torch.zeros(n_examples, M, device=device))
        self._partial, self.grads = {}, {}

    def finish(self) -> Stats:
        """Close the current record and return it."""
        record, self.record = self.record, None
        return record

    # ----------------------------------------------------------------- taps
    def _tap(self, backward_fn, m, j):
        def hook(module, args, out):
            if self.record is None or not torch.is_grad_enabled() or not out.requires_grad:
                return None
            return _Tap.apply(args[0], out, lambda inp, grad: backward_fn(m, j, inp, grad))
        return hook

    def _per_example(self, grad: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        """Σ over each example's tokens of grad_t inp_tᵀ: (n × grad-dim × inp-dim), fp32."""
        n = self.record.sq.shape[0]
        return torch.bmm(grad.reshape(n, -1, grad.shape[-1]).transpose(1, 2).float(),
                         inp.reshape(n, -1, inp.shape[-1]).float())

    def _backward_B(self, m: str, j: int | None, h: torch.Tensor, dB: torch.Tensor) -> None:
        """lora_B's input h (…×r) and output gradient δB (…×out): keep what the lora_A step needs."""
        if self.record is None:
            return
        gB = self._per_example(dB, h)
        if self.keep_grads:
            self.grads[m] = [None, gB]
        if j is not None:
            M1, _, _, _, _, B = self.algebra[j].get()
            self._partial[j] = (torch.einsum("bor,kor->bk", gB, M1), B.T @ gB, gB.transpose(1, 2) @ gB)

    def _backward_A(self, m: str, j: int | None, x: torch.Tensor, dA: torch.Tensor) -> None:
        """lora_A's input x (…×in) and output gradient δA (…×r): finish module m for every example."""
        if self.record is None:
            return
        gA = self._per_example(dA, x)
        if self.keep_grads and m in self.grads:
            self.grads[m][0] = gA
        if j is None or j not in self._partial:
            return
        _, M2, AAt, BtB, A, _ = self.algebra[j].get()
        dot_B, BtgB, gram_B = self._partial.pop(j)
        s = self.algebra[j].target.scaling
        self.record.dots[:, j] += -s * (dot_B + torch.einsum("bri,kri->bk", gA, M2))
        gram_A, gAAt = gA @ gA.transpose(1, 2), gA @ A.T
        self.record.sq[:, j] += s * s * ((gram_B * AAt).sum((1, 2)) + (gram_A * BtB).sum((1, 2))
                                         + 2 * (BtgB * gAAt).sum((1, 2)))

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
