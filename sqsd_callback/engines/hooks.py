"""Per-example scores from the step's own backward pass, never forming a per-example out×in gradient.

A tap on a layer's output receives the layer's input, saved the way the layer saves it (so gradient
checkpointing frees and recomputes it), and its output gradient. Modules of one kind (e.g. every layer's q_proj:
same shape, LoRA rank and direction layout) form a group whose direction products are stacked over its layers:
a tap does a few batched products for its own module and the rest runs once per group per pass, so the Python
and kernel-launch cost per module stays at a handful of operations.

LoRA (one tap on ``lora_B``, saving lora_A's input too; lora_A's output gradient is δB B), with
ΔW_i = −s(gB_i A + B gA_i):
    <ΔW_i, V> = −s(<gB_i, V Aᵀ> + <gA_i, Bᵀ V>)
    ‖ΔW_i‖²  = s²(<gB_iᵀgB_i, AAᵀ> + <gA_i gA_iᵀ, BᵀB> + 2<Bᵀ gB_i, gA_i Aᵀ>)
where gB_i (out×r) and gA_i (r×in) are the example's LoRA factor gradients, summed over its tokens. A tap only
forms them; the rest runs once per group when the pass ends, through low-rank V = B_V A_V's factors:
<gB_i, V Aᵀ> = <gB_iᵀ B_V, (A_V Aᵀ)ᵀ> and <gA_i, Bᵀ V> = <gA_i A_Vᵀ, Bᵀ B_V>, products of width r and rank(V).

Full fine-tuning (one tap per Linear), with ΔW_i = −G_i = −Σ_t δ_t x_tᵀ:
    <ΔW_i, V> = −Σ_t (δ_tᵀ B_V)(A_V x_t)   (every low-rank set in one product; dense V: −Σ_t δ_tᵀ V x_t)
    ‖ΔW_i‖²  = Σ_{t,s} (x_t·x_s)(δ_t·δ_s)   (ghost norm, when 2T² ≤ in·out; else ‖G_i‖² from G_i)
Layers that read the same input tensor (q, k, v; gate, up) share its Gram matrix x xᵀ.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from torch import nn
from torch.profiler import record_function

from ..directions import DirectionBank
from ..distributed import is_sharded
from ..groups import Group, group_modules
from ..modules import LinearTarget, LoraTarget, Target
from .base import Batch, Stats, scoring_mode, summed_example_losses


class _Tap(torch.autograd.Function):
    """Identity on ``out`` whose backward hands ``(*inputs, grad_out)`` to ``fn``; the inputs are saved the way
    autograd saves tensors (so gradient checkpointing frees and recomputes them)."""

    @staticmethod
    def forward(ctx, out, fn, *inputs):
        ctx.save_for_backward(*inputs)
        ctx.fn = fn
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        inputs = ctx.saved_tensors  # unpack once: checkpointing allows one unpack per saved tensor
        ctx.fn(*inputs, grad)
        return (grad, None, *(None for _ in inputs))


class _HookGroup(Group):
    """A group as the engine scores it: the hooks of its modules, what one pass has gathered, what it keeps."""

    def __init__(self, engine: HooksEngine, names: list[str], targets: dict[str, Target],
                 bank: DirectionBank) -> None:
        super().__init__(names, targets, bank)
        self.engine = engine
        self.kept: list = [None] * len(names)

    def reset(self) -> None:
        """A new pass: nothing kept, no per-example products yet."""
        self.kept = [None] * len(self.targets)

    def write(self, record: Stats, dots: torch.Tensor, sq: torch.Tensor) -> None:
        """Put the group's dots (L×n×sets) and squared norms (L×n) in the record."""
        self.put(dots.transpose(0, 1), sq.T, record.dots, record.sq)

    def removed(self, idx: torch.Tensor):
        """Each kept module's parameters with the summed gradients of examples ``idx``; releases what was kept."""
        for target, kept in zip(self.targets, self.kept):
            if kept is not None:
                yield from zip(target.params, self.summed(kept, idx))
        self.kept = [None] * len(self.targets)


class _LoraConstants(NamedTuple):
    """A LoRA group's per-step constants, stacked over its L modules (fp32)."""

    B: torch.Tensor          # L×out×r
    At: torch.Tensor         # L×in×r
    AAt: torch.Tensor        # L×r×r
    BtB: torch.Tensor        # L×r×r
    G: torch.Tensor | None   # A_V Aᵀ, L×Q×r (low-rank sets)
    H: torch.Tensor | None   # Bᵀ B_V, L×r×Q
    dense_right: torch.Tensor | None  # [V_k Aᵀ …], L×out×(r·dense sets)
    dense_left: torch.Tensor | None   # [V_kᵀ B …], L×in×(r·dense sets)


class _LoraGroup(_HookGroup):
    """LoRA modules of one shape and rank. Per pass each module's tap leaves its factor gradients gB_iᵀ (n×r×out)
    and gA_i (n×r×in); at the pass end, for all modules at once, their products with the directions' stacked
    factors and with B, Aᵀ (n×r×Q, n×r×r) and their grams give the dots and norms. What the taps leave grows as
    backward frees the activations."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.reset()

    def hooks(self) -> list:
        """Per module, a hook noting lora_A's input and a tap on lora_B that saves it with lora_B's input. Where
        FSDP2 or ZeRO-3 shard the factors, each factor is also copied when its layer runs (then whole)."""
        handles = []
        sharded = any(is_sharded(p) for t in self.targets for p in t.params)
        for i, t in enumerate(self.targets):
            handles.append(t.lora_A.register_forward_hook(partial(self.note_input, i)))
            handles.append(t.lora_B.register_forward_hook(self.engine.tap(partial(self.backward, i),
                                                                          partial(self.noted_input, i))))
            if sharded:
                handles += [f.register_forward_pre_hook(partial(self.note_factor, i, j))
                            for j, f in enumerate((t.lora_A, t.lora_B))]
        return handles

    def note_factor(self, i: int, j: int, module, args) -> None:
        """Copy factor j (A, B) of module i while its layer runs: the engine has gathered it whole."""
        if self.engine.record is not None and torch.is_grad_enabled():
            self.factors.setdefault(i, [None, None])[j] = module.weight.detach().clone()

    def note_input(self, i: int, module, args, out) -> None:
        if self.engine.recording(out):
            self.inputs[i] = args[0]

    def noted_input(self, i: int) -> tuple:
        return (self.inputs.pop(i, None),)  # None where lora_A is frozen (its input needs no gradient)

    def reset(self) -> None:
        super().reset()
        self.grads: list = [None] * len(self.targets)
        self.inputs: dict[int, torch.Tensor] = {}
        self.factors: dict[int, list] = {}  # module -> [A, B] copied in the forward (sharded factors only)
        self.const: _LoraConstants | None = None

    def constants(self) -> _LoraConstants:
        """The factors' products with themselves and the directions, stacked over the modules, fp32; made at the
        pass's first tap from the parameters that pass used, and never carried to the next pass: optimizers update
        parameters in place without bumping their version counters (fused AdamW, 8-bit optimizers, DeepSpeed's
        write-back), so nothing but the pass itself says they are current. All r×r or r×Q, except B and Aᵀ
        themselves and the dense sets' V Aᵀ, Vᵀ B."""
        if self.const is not None:
            return self.const
        with torch.no_grad(), record_function("sqsd::constants"):
            live = [self.factors[i] if self.factors else (t.A.detach(), t.B.detach())
                    for i, t in enumerate(self.targets)]
            A = torch.stack([a for a, _ in live]).float()   # L×r×in
            B = torch.stack([b for _, b in live]).float()   # L×out×r
            At, Bt = A.transpose(1, 2), B.transpose(1, 2)
            low = (self.VAt.transpose(1, 2) @ At, Bt @ self.VB) if self.low else (None, None)
            dense = (torch.cat([torch.stack([d[k].dense @ a for d, a in zip(self.dirs, At)]) for k in self.dense], 2),
                     torch.cat([torch.stack([d[k].dense.T @ b for d, b in zip(self.dirs, B)]) for k in self.dense],
                               2)) if self.dense else (None, None)
            self.const = _LoraConstants(B, At, A @ At, Bt @ B, *low, *dense)
        return self.const

    def backward(self, i: int, x: torch.Tensor, h: torch.Tensor, dB: torch.Tensor) -> None:
        """lora_A's input x (…×in), lora_B's input h (…×r) and output gradient δB (…×out); lora_A's output
        gradient is δB B."""
        split = self.engine.split
        dB = split(dB)
        B = self.constants().B[i] if self.scored else self.targets[i].B.detach().float()
        gBt = torch.bmm(split(h).transpose(1, 2), dB)             # gB_iᵀ: n×r×out
        if x is None:
            gA = gBt.new_zeros(gBt.shape[0], B.shape[1], self.targets[i].shape[1])
        else:
            gA = torch.bmm((dB @ B).transpose(1, 2), split(x))     # n×r×in
        if self.engine.keep_grads:
            self.kept[i] = [gA, gBt.transpose(1, 2)]
        if self.scored:
            self.grads[i] = (gBt, gA)

    def finish(self, record: Stats) -> None:
        if not self.scored or all(g is None for g in self.grads):
            return
        some = next(g for g in self.grads if g is not None)
        gBt, gA = (torch.stack([torch.zeros_like(some[j]) if g is None else g[j] for g in self.grads])
                   for j in (0, 1))  # zeros: a module no gradient reached
        self.grads = [None] * len(self.targets)
        (L, n, r), c = gBt.shape[:3], self.const
        gb, ga = gBt.flatten(1, 2), gA.flatten(1, 2)
        parts = []
        if self.low:  # <gB, V Aᵀ> = Σ (gBᵀ B_V) ⊙ (A_V Aᵀ)ᵀ, <gA, Bᵀ V> = Σ (gA A_Vᵀ) ⊙ (Bᵀ B_V)
            right, left = (gb @ self.VB).view(L, n, r, -1), (ga @ self.VAt).view(L, n, r, -1)
            parts.append(self.block_sums((right * c.G.transpose(1, 2)[:, None] + left * c.H[:, None]).sum(2)))
        if self.dense:  # block k's trace
            both = (gb @ c.dense_right + ga @ c.dense_left).view(L, n, r, -1, r)
            parts.append(both.diagonal(dim1=2, dim2=4).sum(-1))
        s = self.scaling(gBt.device)[:, None]
        gBtB, gAAt = (gb @ c.B).view(L, n, r, r), (ga @ c.At).view(L, n, r, r)
        sq = s * s * (((gBt @ gBt.transpose(-2, -1)) * c.AAt[:, None]).sum((-2, -1))
                      + ((gA @ gA.transpose(-2, -1)) * c.BtB[:, None]).sum((-2, -1))
                      + 2 * (gBtB * gAAt.transpose(-2, -1)).sum((-2, -1)))
        self.write(record, -s[..., None] * torch.cat(parts, -1), sq)

    @staticmethod
    def summed(kept: list, idx: torch.Tensor) -> list[torch.Tensor]:
        return [g.index_select(0, idx).sum(0) for g in kept]


class _LinearGroup(_HookGroup):
    """Fully trained Linear layers of one shape. Per pass each module fills ``low[l]`` (n×Q: Σ_t of
    (δ_tᵀB_V)⊙(A_V x_t)), ``dense_dots[l]`` (n×dense sets) and ``sq[l]`` (n)."""

    def hooks(self) -> list:
        return [t.module.register_forward_hook(self.engine.tap(partial(self.backward, i)))
                for i, t in enumerate(self.targets)]

    def reset(self) -> None:
        super().reset()
        self.buf = None

    def backward(self, i: int, x_in: torch.Tensor, delta_in: torch.Tensor) -> None:
        x, delta = self.engine.split(x_in), self.engine.split(delta_in)
        if self.engine.keep_grads:
            self.kept[i] = (x, delta)
        if not self.scored:
            return
        if self.buf is None:
            L, n = len(self.targets), x.shape[0]
            self.buf = x.new_zeros(L, n, self.Q + len(self.dense) + 1)
        row, Q = self.buf[i], self.Q
        if self.low:
            row[:, :Q] = ((delta @ self.VB[i]) * (x @ self.VAt[i])).sum(1)
        for j, k in enumerate(self.dense):
            row[:, Q + j] = (delta * (x @ self.dirs[i][k].dense.T)).sum((1, 2))
        T, (out, inp) = x.shape[1], self.targets[i].shape
        if 2 * T * T <= inp * out:
            row[:, -1] = (self.engine.gram(x_in, x) * (delta @ delta.transpose(1, 2))).sum((1, 2))
        else:
            row[:, -1] = torch.bmm(delta.transpose(1, 2), x).pow(2).sum((1, 2))

    def finish(self, record: Stats) -> None:
        if not self.scored or self.buf is None:
            return
        Q = self.Q
        low = [self.block_sums(self.buf[..., :Q])] if self.low else []
        dots = torch.cat(low + [self.buf[..., Q:-1]], -1)
        self.write(record, -dots, self.buf[..., -1])

    @staticmethod
    def summed(kept: tuple, idx: torch.Tensor) -> list[torch.Tensor]:
        x, delta = (t.index_select(0, idx) for t in kept)
        return [torch.einsum("nto,nti->oi", delta, x)]


GROUPS = {LoraTarget: _LoraGroup, LinearTarget: _LinearGroup}


class HooksEngine:
    """Scores every example of each forward/backward pass the model runs while attached.

    With ``keep_grads`` it also keeps, for every target (not only those with directions), what it needs to
    give any examples' summed gradients afterwards (``removed``): what exact removal from the update needs.
    """

    name = "hooks"

    def __init__(self, targets: dict[str, Target], bank: DirectionBank, keep_grads: bool = False) -> None:
        self.targets, self.bank, self.keep_grads = targets, bank, keep_grads
        self.groups = group_modules(targets if keep_grads else bank.modules, targets, bank,
                                    make=lambda names, *args: GROUPS[type(targets[names[0]])](self, names, *args))
        self.handles: list = []
        self.record: Stats | None = None
        self.segments = None
        self._grams: list = []

    # -------------------------------------------------------------- lifecycle
    def attach(self) -> None:
        if self.handles:
            return
        for group in self.groups:
            self.handles += group.hooks()

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def start(self, n_examples: int, device, segments=None) -> None:
        """Open a record for the next pass over ``n_examples`` examples: one per row, or where ``segments``
        (a packed batch's :class:`Segments`) say."""
        K, M = len(self.bank.sets), len(self.bank.modules)
        self.record = Stats(torch.zeros(n_examples, M, K, device=device), torch.zeros(n_examples, M, device=device))
        self.segments, self._grams = segments, []
        for group in self.groups:
            group.reset()

    def finish(self) -> Stats:
        """Close the current record and return it."""
        record, self.record, self._grams = self.record, None, []
        with record_function("sqsd::finish"):
            for group in self.groups:
                group.finish(record)
        return record

    def removed(self, idx: torch.Tensor):
        """For each target, its parameters paired with the summed gradients of examples ``idx`` of the last pass
        (``keep_grads`` only); the kept tensors are released."""
        for group in self.groups:
            yield from group.removed(idx)

    def recording(self, out: torch.Tensor) -> bool:
        """Whether a layer output belongs to a pass being scored."""
        return self.record is not None and torch.is_grad_enabled() and out.requires_grad

    def tap(self, fn, saved_before=tuple):
        """A forward hook whose backward calls ``fn(*saved_before(), layer input, output gradient)``."""
        def backward(*args):
            if self.record is not None:
                fn(*args)

        def hook(module, args, out):
            if self.recording(out):
                return _Tap.apply(out, backward, *saved_before(), args[0])
        return hook

    # -------------------------------------------------------------- shared math
    def split(self, t: torch.Tensor) -> torch.Tensor:
        """Activations (rows × length × d) as (examples × tokens × d), fp32."""
        if self.segments is not None:
            return self.segments.split(t.float())
        return t.reshape(self.record.sq.shape[0], -1, t.shape[-1]).float()

    def per_example(self, grad: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        """Σ over each example's tokens of grad_t inp_tᵀ: (n × grad-dim × inp-dim), fp32."""
        return torch.bmm(self.split(grad).transpose(1, 2), self.split(inp))

    def gram(self, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x xᵀ per example (n×T×T) for ``x``, the split form of the layer input ``raw``. Layers reading the same
        input tensor share one; the last two inputs are held so that their memory cannot be reused meanwhile."""
        key = (raw.data_ptr(), raw.shape, raw.stride(), raw.dtype)
        for _, held_key, g in self._grams:
            if held_key == key:
                return g
        g = x @ x.transpose(1, 2)
        self._grams = [(raw, key, g), *self._grams[:1]]
        return g

    # -------------------------------------------------------------- offline
    def compute(self, model: nn.Module, batch: Batch) -> Stats:
        """One batched forward/backward at the current parameters; each example's loss is its own mean, so the
        result equals the batch-size-1 reference."""
        was_attached = bool(self.handles)
        self.attach()
        try:
            with scoring_mode(model, self.targets) as params:
                self.start(batch.input_ids.shape[0], batch.input_ids.device)
                torch.autograd.grad(summed_example_losses(model, batch), params, allow_unused=True)
                return self.finish()
        finally:
            self.record = None
            if not was_attached:
                self.detach()
