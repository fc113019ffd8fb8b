"""LoRA on a Linear layer (PEFT's ``lora.Linear`` and QLoRA's bitsandbytes 4-/8-bit layers): the merged delta is
``s · lora_B.weight @ lora_A.weight`` (out×in, whatever the base layer's storage: PEFT orients ``fan_in_fan_out``
bases itself).

Per example, with gB_i (out×r) and gA_i (r×in) its factor gradients summed over its tokens and
ΔW_i = −s(gB_i A + B gA_i):
    <ΔW_i, V> = −s(<gB_i, V Aᵀ> + <gA_i, Bᵀ V>)
    ‖ΔW_i‖²  = s²(<gB_iᵀgB_i, AAᵀ> + <gA_i gA_iᵀ, BᵀB> + 2<Bᵀ gB_i, gA_i Aᵀ>)
One tap on ``lora_B`` (saving lora_A's input too; lora_A's output gradient is δB B) forms gB_i, gA_i; the rest runs
once per group when the pass ends, through low-rank V = B_V A_V's factors: <gB_i, V Aᵀ> = <gB_iᵀ B_V, (A_V Aᵀ)ᵀ>
and <gA_i, Bᵀ V> = <gA_i A_Vᵀ, Bᵀ B_V>, products of width r and rank(V).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from torch.profiler import record_function

from ..groups import Group, HookGroup
from ..naming import canonical_name
from ..runtime.distributed import is_sharded
from .registry import LayerKind, register

if TYPE_CHECKING:
    from ..directions import DirectionSet


@dataclass
class LoraTarget:
    """One LoRA-adapted Linear: its merged delta is ``scaling · lora_B.weight @ lora_A.weight`` (out×in)."""

    name: str
    lora_A: nn.Linear
    lora_B: nn.Linear
    scaling: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.lora_B.out_features, self.lora_A.in_features)

    @property
    def rank(self) -> int:
        return self.lora_A.weight.shape[0]

    @property
    def A(self) -> torch.Tensor:
        return self.lora_A.weight

    @property
    def B(self) -> torch.Tensor:
        return self.lora_B.weight

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.A, self.B)

    def update(self, gA: torch.Tensor, gB: torch.Tensor) -> torch.Tensor:
        """Per-example first-order change of the merged delta, −s(gB A + B gA), dense (n×out×in), fp64."""
        A, B = self.A.detach().double(), self.B.detach().double()
        return -self.scaling * (gB.double() @ A + B @ gA.double())

    def snapshot(self, sample: int = 1) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The merged delta now, as factors ``(s·B, A)`` (fp32 copies); None while B = 0 (PEFT's initialisation:
        the delta is zero, and a copy would cost as much memory as the adapter). ``sample`` is for full
        fine-tuning's kinds: a LoRA θ_0 is small already."""
        if not self.B.detach().any():
            return None
        return (self.scaling * self.B.detach().float(), self.A.detach().float().clone())


def lora_linear_types() -> tuple[type, ...]:
    """PEFT's LoRA layer classes whose update is ``scaling · lora_B @ lora_A`` over Linear factors: LoRA on a Linear,
    and QLoRA's bitsandbytes 4-bit and 8-bit base layers (present where bitsandbytes is installed)."""
    from peft.tuners.lora import layer as lora_layer
    try:
        from peft.tuners.lora import bnb
    except ImportError:  # older PEFT imports bitsandbytes unguarded; without it there are no bnb layers anyway
        bnb = None
    return (lora_layer.Linear, *(getattr(bnb, n) for n in ("Linear4bit", "Linear8bitLt") if hasattr(bnb, n)))


def _adapters(module: nn.Module) -> list[str]:
    """The active adapters a PEFT LoRA layer actually holds (in any of its factor containers)."""
    held = [k for attr in ("lora_A", "lora_embedding_A") for k in getattr(module, attr, {})]
    return [a for a in module.active_adapters if a in held]


def lora_targets(model: nn.Module, required: bool = True) -> dict[str, LoraTarget]:
    """Every active vanilla-LoRA Linear in ``model`` (QLoRA's 4-/8-bit layers included), keyed by the base model's
    module name; a LoRA layer of any other kind (embedding, convolution, a type this package does not know) is an
    error naming its type, since its update cannot be scored as one."""
    from peft.tuners.lora.layer import LoraLayer
    known = lora_linear_types()
    targets: dict[str, LoraTarget] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        active = _adapters(module)
        if not active:
            continue
        if not isinstance(module, known):
            kind = f"{type(module).__module__}.{type(module).__qualname__}"
            raise ValueError(f"{name} is a LoRA layer of type {kind}, which SQSD cannot score: it scores LoRA on "
                             f"Linear layers ({', '.join(t.__qualname__ for t in known)}). Leave this module out "
                             f"of the LoraConfig's target_modules.")
        if len(active) > 1:
            raise ValueError(f"{name} has several active LoRA adapters {active}; score one adapter at a time "
                             f"(model.set_adapter(name)).")
        adapter = active[0]
        if adapter in getattr(module, "lora_variant", {}):
            variant = type(module.lora_variant[adapter]).__name__
            raise ValueError(f"{name}: adapter {adapter!r} is a LoRA variant ({variant}, e.g. DoRA) whose update "
                             f"is not scaling·B@A; use plain LoRA.")
        if getattr(getattr(module.get_base_layer().weight, "quant_state", None), "packing_format_for_cpu", False):
            raise ValueError(f"{name}: bitsandbytes repacked this 4-bit layer's weight for its AVX512-BF16 inference "
                             f"kernel (the layer ran in eval mode on an input without gradient, e.g. generate() "
                             f"before training), and that kernel has no backward: gradients through it are lost, "
                             f"for training and for SQSD alike. Reload the model, and set "
                             f"support_avx512bf16_for_cpu = False on its Linear4bit layers before any eval-mode "
                             f"forward.")
        if getattr(module, "merged", False):
            raise ValueError(f"{name}: the LoRA adapter is merged into the base weight; unmerge it "
                             f"(model.unmerge_adapter()) so its factors can be scored.")
        targets[canonical_name(name)] = LoraTarget(
            canonical_name(name), module.lora_A[adapter], module.lora_B[adapter], float(module.scaling[adapter])
        )
    if not targets and required:
        raise ValueError(
            "The model has no active LoRA Linear layer: wrap it with peft.get_peft_model(model, LoraConfig(...)) "
            "before training or scoring."
        )
    return targets


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


def shared_start(targets: Mapping[str, object], direction_set: DirectionSet) -> tuple[float, int]:
    """How far the run's LoRA A factors coincide with a low-rank direction set's own A (``a_cosine``; sharded
    factors left out). A shared A puts every update in the set's row space, so the cosines and drift of the first
    steps measure that shared start, not the data."""
    return a_cosine({m: t.A for m, t in targets.items() if isinstance(t, LoraTarget) and not is_sharded(t.A)},
                    direction_set)


class _LoraConstants(NamedTuple):
    """Per-pass constants of some of a LoRA group's modules, stacked over them (fp32)."""

    B: torch.Tensor          # L×out×r
    At: torch.Tensor         # L×in×r
    AAt: torch.Tensor        # L×r×r
    BtB: torch.Tensor        # L×r×r
    G: torch.Tensor | None   # A_V Aᵀ, L×Q×r (low-rank sets)
    H: torch.Tensor | None   # Bᵀ B_V, L×r×Q
    dense_right: torch.Tensor | None  # [V_k Aᵀ …], L×out×(r·dense sets)
    dense_left: torch.Tensor | None   # [V_kᵀ B …], L×in×(r·dense sets)


class LoraHooks(HookGroup):
    """LoRA modules of one shape and rank. Each module's tap forms its factor gradients gB_iᵀ (n×r×out) and gA_i
    (n×r×in) and sets them aside; every ``FLUSH_EVERY`` modules (and at the pass end) the set-aside ones are
    reduced at once, by their products with the directions' stacked factors and with B, Aᵀ (n×r×Q, n×r×r), to the
    record's dots and norms. Batching a few modules keeps the kernel count per module low; flushing often keeps
    what waits to a few layers' worth, where the end-of-pass batch held every layer's (1.14× peak memory at 30
    layers)."""

    FLUSH_EVERY = 4

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
            handles.append(t.lora_B.register_forward_hook(self.engine.tap(t.name, partial(self.backward, i),
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
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (gB_iᵀ, gA_i) to reduce
        self.inputs: dict[int, torch.Tensor] = {}
        self.factors: dict[int, list] = {}  # module -> [A, B] copied in the forward (sharded factors only)

    def factors_used(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Module i's (A, B) as this pass used them: the live parameters, or where they are sharded, the copies
        made when its layer ran. Read in the pass itself, never carried to the next: optimizers update parameters
        in place without bumping their version counters (fused AdamW, 8-bit optimizers, DeepSpeed's write-back)."""
        if self.factors:
            return tuple(self.factors[i])
        t = self.targets[i]
        return t.A.detach(), t.B.detach()

    def constants(self, idx: list[int], VB: torch.Tensor | None, VAt: torch.Tensor | None) -> _LoraConstants:
        """Modules ``idx``'s factor products with themselves and with the directions (``VB``, ``VAt``: their
        stacked low-rank factors), stacked, fp32. All r×r or r×Q, except B and Aᵀ themselves and the dense sets'
        V Aᵀ, Vᵀ B."""
        with torch.no_grad(), record_function("sqsd::constants"):
            live = [self.factors_used(i) for i in idx]
            A = torch.stack([a for a, _ in live]).float()   # L×r×in
            B = torch.stack([b for _, b in live]).float()   # L×out×r
            At, Bt = A.transpose(1, 2), B.transpose(1, 2)
            low = (VAt.transpose(1, 2) @ At, Bt @ VB) if self.low else (None, None)
            dirs = [self.dirs[i] for i in idx]
            dense = (torch.cat([torch.stack([d[k].times_right(a) for d, a in zip(dirs, At)]) for k in self.dense], 2),
                     torch.cat([torch.stack([d[k].times_left(b.T).T for d, b in zip(dirs, B)]) for k in self.dense], 2)
                     ) if self.dense else (None, None)
            return _LoraConstants(B, At, A @ At, Bt @ B, *low, *dense)

    def backward(self, i: int, x: torch.Tensor, h: torch.Tensor, dB: torch.Tensor) -> None:
        """lora_A's input x (…×in), lora_B's input h (…×r) and output gradient δB (…×out); lora_A's output
        gradient is δB B."""
        tokens = self.engine.tokens
        dB = tokens(dB)
        B = self.factors_used(i)[1].float()
        gBt = torch.bmm(tokens(h).transpose(1, 2), dB)             # gB_iᵀ: n×r×out
        if x is None:
            gA = gBt.new_zeros(gBt.shape[0], B.shape[1], self.targets[i].shape[1])
        else:
            gA = torch.bmm((dB @ B).transpose(1, 2), tokens(x))     # n×r×in
        if self.engine.keep_grads:
            self.kept[i] = [gA, gBt.transpose(1, 2)]
        if self.scored:
            self.pending[i] = (gBt, gA)
            if len(self.pending) >= self.FLUSH_EVERY:
                self.flush(self.engine.record)

    def finish(self, record) -> None:
        if self.scored and self.pending:
            self.flush(record)

    def flush(self, record) -> None:
        """Reduce the set-aside modules' factor gradients to their dots and norms in ``record``."""
        idx = sorted(self.pending)
        gBt, gA = (torch.stack([self.pending[i][j] for i in idx]) for j in (0, 1))
        self.pending = {}
        # modules arrive layer after layer, so idx is usually a run: a slice selects it without copying
        sel = slice(idx[0], idx[-1] + 1) if idx[-1] - idx[0] == len(idx) - 1 else idx
        VB, VAt = self.low_factors(sel) if self.low else (None, None)
        c = self.constants(idx, VB, VAt)
        (L, n, r) = gBt.shape[:3]
        gb, ga = gBt.flatten(1, 2), gA.flatten(1, 2)
        parts = []
        if self.low:  # <gB, V Aᵀ> = Σ (gBᵀ B_V) ⊙ (A_V Aᵀ)ᵀ, <gA, Bᵀ V> = Σ (gA A_Vᵀ) ⊙ (Bᵀ B_V)
            right, left = (gb @ VB).view(L, n, r, -1), (ga @ VAt).view(L, n, r, -1)
            parts.append(self.block_sums((right * c.G.transpose(1, 2)[:, None] + left * c.H[:, None]).sum(2)))
        if self.dense:  # block k's trace
            both = (gb @ c.dense_right + ga @ c.dense_left).view(L, n, r, -1, r)
            parts.append(both.diagonal(dim1=2, dim2=4).sum(-1))
        s = self.scaling(gBt.device)[sel][:, None]
        gBtB, gAAt = (gb @ c.B).view(L, n, r, r), (ga @ c.At).view(L, n, r, r)
        sq = s * s * (((gBt @ gBt.transpose(-2, -1)) * c.AAt[:, None]).sum((-2, -1))
                      + ((gA @ gA.transpose(-2, -1)) * c.BtB[:, None]).sum((-2, -1))
                      + 2 * (gBtB * gAAt.transpose(-2, -1)).sum((-2, -1)))
        self.write(record, -s[..., None] * torch.cat(parts, -1), sq, sel)

    @staticmethod
    def summed(target: LoraTarget, kept: list, idx: torch.Tensor) -> list[torch.Tensor]:
        return [g.index_select(0, idx).sum(0) for g in kept]


def lora_drift(group: Group, start: list) -> tuple[torch.Tensor, torch.Tensor]:
    """θ_t − θ_0 = P Q with P = [sB_t − sB_0, sB_0] (L×out×2r), Q = [A_t; A_t − A_0] (just sB_t, A_t where every θ_0
    delta is zero): <PQ, B_V A_V> = Σ (Pᵀ B_V) ⊙ (Q A_Vᵀ), <PQ, V> = Σ Q ⊙ (Pᵀ V), ‖PQ‖² = <PᵀP, QQᵀ>. The factors
    hold the factors' own changes, so a small step (DPO's default lr 1e-6 from a trained adapter) is not lost to
    cancellation between θ_t's and θ_0's terms in fp32 (‖PQ‖² from [sB_t, −sB_0], [A_t; A_0] came out negative)."""
    scale = group.scaling(group.targets[0].B.device)
    P = torch.stack([t.B.detach() for t in group.targets]).float() * scale[:, None, None]
    Q = torch.stack([t.A.detach() for t in group.targets]).float()
    if any(s is not None for s in start):
        sB0 = torch.stack([torch.zeros_like(p) if s is None else s[0] for s, p in zip(start, P)])
        A0 = torch.stack([torch.zeros_like(q) if s is None else s[1] for s, q in zip(start, Q)])
        P, Q = torch.cat([P - sB0, sB0], 2), torch.cat([Q, Q - A0], 1)
    Pt = P.transpose(1, 2)
    VB, VAt = group.low_factors() if group.low else (None, None)
    dots = [group.block_sums(((Pt @ VB) * (Q @ VAt)).sum(1))] if group.low else []
    dots += [torch.stack([(q * d[k].times_left(p.T)).sum() for p, q, d in zip(P, Q, group.dirs)])[:, None]
             for k in group.dense]
    return torch.cat(dots, 1), ((Pt @ P) * (Q @ Q.transpose(1, 2))).sum((1, 2))


LORA = register(LayerKind("LoRA Linear", LoraTarget, partial(lora_targets, required=False), LoraHooks, lora_drift,
                          adapter=True))
