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
    """Scores every example of each forward/backward pass the model runs while attached."""

    name = "hooks"

    def __init__(self, targets: dict[str, LoraTarget], bank: DirectionBank) -> None:
        self.targets, self.bank = targets, bank
        self.algebra = [_Algebra(targets[m], bank.per_module[m]) for m in bank.modules]
        self.handles: list = []
        self.record: Stats | None = None
        self._partial: dict[int, tuple] = {}

    # -------------------------------------------------------------- lifecycle
    def attach(self) -> None:
        if self.handles:
            return
        for j, m in enumerate(self.bank.modules):
            t = self.targets[m]
            self.handles.append(t.lora_B.register_forward_hook(self._tap(self._backward_B, j)))
            self.handles.append(t.lora_A.register_forward_hook(self._tap(self._backward_A, j)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def start(self, n_examples: int, device) -> None:
        """Open a record for the next pass over ``n_examples`` rows."""
        K, M = len(self.bank.sets), len(self.bank.modules)
        self.record = Stats(torch.zeros(n_examples, M, K, device=device), torch.zeros(n_examples, M, device=device))
        self._partial = {}

    def finish(self) -> Stats:
        """Close the current record and return it."""
        record, self.record = self.record, None
        return record

    # ----------------------------------------------------------------- taps
    def _tap(self, backward_fn, j):
        def hook(module, args, out):
            if self.record is None or not torch.is_grad_enabled() or not out.requires_grad:
                return None
            return _Tap.apply(args[0], out, lambda inp, grad: backward_fn(j, inp, grad))
        return hook

    def _backward_B(self, j: int, h: torch.Tensor, dB: torch.Tensor) -> None:
        """lora_B's input h (…×r) and output gradient δB (…×out): keep what the lora_A step needs, drop gB."""
        if self.record is None:
            return
        M1, _, _, _, _, B = self.algebra[j].get()
        n = self.record.sq.shape[0]
        gB = torch.bmm(dB.reshape(n, -1, dB.shape[-1]).transpose(1, 2).float(), h.reshape(n, -1, h.shape[-1]).float())
        self._partial[j] = (torch.einsum("bor,kor->bk", gB, M1), B.T @ gB, gB.transpose(1, 2) @ gB)

    def _backward_A(self, j: int, x: torch.Tensor, dA: torch.Tensor) -> None:
        """lora_A's input x (…×in) and output gradient δA (…×r): finish module j for every example."""
        if self.record is None or j not in self._partial:
            return
        _, M2, AAt, BtB, A, _ = self.algebra[j].get()
        dot_B, BtgB, gram_B = self._partial.pop(j)
        n = self.record.sq.shape[0]
        gA = torch.bmm(dA.reshape(n, -1, dA.shape[-1]).transpose(1, 2).float(), x.reshape(n, -1, x.shape[-1]).float())
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
