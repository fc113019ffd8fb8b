"""A plain Linear layer trained in full: the example's update is ΔW_i = −G_i = −Σ_t δ_t x_tᵀ (out×in).

One tap per layer, on its output:
    <ΔW_i, V> = −Σ_t (δ_tᵀ B_V)(A_V x_t)   (every low-rank set in one product; dense V: −Σ_t δ_tᵀ V x_t)
    ‖ΔW_i‖²  = Σ_{t,s} (x_t·x_s)(δ_t·δ_s)   (ghost norm, when 2T² ≤ in·out; else ‖G_i‖² from G_i)
Layers that read the same input tensor (q, k, v; gate, up) share its Gram matrix x xᵀ. The math is in the out×in
orientation; ``LinearTarget.oriented`` is the one place a kind stored in×out (GPT-2's Conv1D) differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..groups import Group, HookGroup
from ..naming import canonical_name
from .registry import LayerKind, register


@dataclass
class LinearTarget:
    """A plain layer trained in full; its weight is stored out×in (nn.Linear), or in×out where ``transposed``."""

    name: str
    module: nn.Module
    transposed = False

    def oriented(self, w: torch.Tensor) -> torch.Tensor:
        """Between the weight's own layout and out×in (the same transpose both ways), for one matrix or a stack."""
        return w.transpose(-2, -1) if self.transposed else w

    @property
    def weight_oi(self) -> torch.Tensor:
        return self.oriented(self.module.weight)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight_oi.shape)

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.module.weight,)

    def update(self, g: torch.Tensor) -> torch.Tensor:
        """Per-example update from per-example weight gradients (n × the weight's layout): −g as n×out×in, fp64."""
        return -self.oriented(g).double()

    def snapshot(self, sample: int = 1) -> torch.Tensor | Sampled:
        """θ_0 for drift: a copy of W as out×in in its own dtype and device (one copy of the covered weights), or,
        with ``sample`` > 1, W at one entry in about ``sample`` (:class:`Sampled`)."""
        if sample == 1:
            return self.weight_oi.detach().clone()
        stride = sample_stride(sample, self.module.weight.shape[-1])
        return Sampled(self.lattice(stride).clone(), stride)

    def lattice(self, stride: int) -> torch.Tensor:
        """Every ``stride``-th entry of W in its own storage order: the entries a :class:`Sampled` θ_0 keeps."""
        return self.module.weight.detach().reshape(-1)[::stride]


@dataclass
class Sampled:
    """θ_0 of a fully trained weight kept at every ``stride``-th entry of the weight's own storage order, where the
    stride is coprime with the row length so that every row and every column is sampled alike; and its exact dots
    with the direction sets (fp64), taken by the drift's first measurement, which ``Drift`` makes at θ_0."""

    values: torch.Tensor
    stride: int
    dots: torch.Tensor | None = None


def sample_stride(sample: int, row: int) -> int:
    """The smallest stride ≥ ``sample`` coprime with the row length ``row`` (a divisor of it would sample the same
    columns in every row)."""
    stride = sample
    while math.gcd(stride, row) != 1:
        stride += 1
    return stride


def linear_targets(model: nn.Module) -> dict[str, LinearTarget]:
    """The model's trainable nn.Linear layers (exactly that class: LoRA and quantized layers are other kinds)."""
    return {canonical_name(n): LinearTarget(canonical_name(n), m) for n, m in model.named_modules()
            if type(m) is nn.Linear and m.weight.requires_grad}


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every nn.Linear's weight (subclasses too), out×in, trained or not."""
    return {canonical_name(n): m.weight.detach() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


class LinearHooks(HookGroup):
    """Fully trained layers of one shape. Per pass each module fills ``low[l]`` (n×Q: Σ_t of
    (δ_tᵀB_V)⊙(A_V x_t)), ``dense_dots[l]`` (n×dense sets) and ``sq[l]`` (n)."""

    def hooks(self) -> list:
        return [t.module.register_forward_hook(self.engine.tap(t.name, partial(self.backward, i)))
                for i, t in enumerate(self.targets)]

    def reset(self) -> None:
        super().reset()
        self.buf = None

    def backward(self, i: int, x_in: torch.Tensor, delta_in: torch.Tensor) -> None:
        x, delta = self.engine.tokens(x_in), self.engine.tokens(delta_in)
        if self.engine.keep_grads:
            self.kept[i] = (x, delta)
        if not self.scored:
            return
        if self.buf is None:
            L, n = len(self.targets), x.shape[0]
            self.buf = x.new_zeros(L, n, self.Q + len(self.dense) + 1)
        row, Q = self.buf[i], self.Q
        if self.low:
            VB, VAt = self.low_factors(i)
            row[:, :Q] = ((delta @ VB) * (x @ VAt)).sum(1)
        for j, k in enumerate(self.dense):
            row[:, Q + j] = (delta * (x @ self.dirs[i][k].dense.float().T)).sum((1, 2))
        T, (out, inp) = x.shape[1], self.targets[i].shape
        if 2 * T * T <= inp * out:
            row[:, -1] = (self.engine.gram(x_in, x) * (delta @ delta.transpose(1, 2))).sum((1, 2))
        else:
            row[:, -1] = torch.bmm(delta.transpose(1, 2), x).pow(2).sum((1, 2))

    def finish(self, record) -> None:
        if not self.scored or self.buf is None:
            return
        Q = self.Q
        low = [self.block_sums(self.buf[..., :Q])] if self.low else []
        dots = torch.cat(low + [self.buf[..., Q:-1]], -1)
        self.write(record, -dots, self.buf[..., -1])

    @staticmethod
    def summed(target: LinearTarget, kept: tuple, idx: torch.Tensor) -> list[torch.Tensor]:
        x, delta = (t.index_select(0, idx) for t in kept)
        return [target.oriented(torch.einsum("nto,nti->oi", delta, x))]


ROW_BLOCK = 2**22
"""Entries of a weight the drift reads at a time (its fp32 or fp64 temporaries stay ≤ 32 MiB even for an
output layer)."""


def linear_drift(group: Group, start: list) -> tuple[torch.Tensor, torch.Tensor]:
    """D = W_t − W_0 per module (out×in): <D, B_V A_V> = Σ B_V ⊙ (D A_Vᵀ), <D, V>, ‖D‖², a block of rows at a
    time. From a :class:`Sampled` θ_0: <D, V> = <W_t, V> − <W_0, V> in fp64 (exact: the weights' own rounding is
    far below fp64's), and ‖D‖² from the sampled entries, scaled to the whole matrix."""
    dots, sq = [], []
    for i, (t, w0) in enumerate(zip(group.targets, start)):
        w, sampled = t.weight_oi.detach(), isinstance(w0, Sampled)
        dtype = torch.float64 if sampled else torch.float32
        VAt = group.VAt[i].to(dtype) if group.low else None
        low = w.new_zeros(group.Q, dtype=dtype)
        dense = w.new_zeros(len(group.dense), dtype=dtype)
        total = w.new_zeros((), dtype=dtype)
        rows = max(1, ROW_BLOCK // w.shape[1])
        for r in range(0, w.shape[0], rows):
            block = slice(r, r + rows)
            M = w[block].to(dtype) if sampled else w[block].float() - w0[block].float()
            if group.low:
                low += ((M @ VAt) * group.VB[i][block].to(dtype)).sum(0)
            for j, k in enumerate(group.dense):
                dense[j] += (M * group.dirs[i][k].dense[block]).sum()
            if not sampled:
                total += M.pow(2).sum()
        row = torch.cat(([group.block_sums(low)] if group.low else []) + [dense])
        if sampled:
            if w0.dots is None:  # the first measurement, at θ_0
                w0.dots = row
            row = row - w0.dots
            kept = t.lattice(w0.stride)
            total = (kept.double() - w0.values.double()).pow(2).sum() * (w.numel() / kept.numel())
        dots.append(row.float())
        sq.append(total.float())
    return torch.stack(dots), torch.stack(sq)


LINEAR = register(LayerKind("Linear", LinearTarget, linear_targets, LinearHooks, linear_drift,
                            weights=linear_weights))
