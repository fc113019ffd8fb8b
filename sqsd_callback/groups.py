"""Modules of one kind (e.g. every layer's q_proj) with their direction sets stacked over the layers, so that the
hooks engine and the drift do their per-module algebra as a few batched operations per group, not per module."""

from __future__ import annotations

import torch

from .bank import DirectionBank
from .types import Direction, Stats, Target


def _layout(d: Direction | None):
    """What the modules of a group agree on for each set: absent (None), ``"dense"``, or the rank of V."""
    return None if d is None else "dense" if d.dense is not None else d.A.shape[0]


class Group:
    """Modules of one target type, shape, LoRA rank and direction layout. Low-rank sets' factors are stacked over
    the group's L modules, side by side (``VB``: L×out×Q, ``VAt``: L×in×Q; set ``low[j]`` in columns
    ``cols[j]``; one copy, shared through the bank); dense sets stay per module (as large as the weights: never
    copied). A scored group's results go to module rows ``slots`` and set columns ``sets`` (= ``low + dense``)."""

    def __init__(self, names: list[str], targets: dict[str, Target], bank: DirectionBank) -> None:
        self.names, self.targets = names, [targets[m] for m in names]
        self.dirs = [bank.per_module.get(m) for m in names]
        slot = {m: j for j, m in enumerate(bank.modules)}
        self.scored = names[0] in slot
        if not self.scored:
            return
        layout = [_layout(d) for d in self.dirs[0]]
        self.low = [k for k, lay in enumerate(layout) if isinstance(lay, int)]
        self.dense = [k for k, lay in enumerate(layout) if lay == "dense"]
        edges = [0]
        for k in self.low:
            edges.append(edges[-1] + layout[k])
        self.cols = [slice(a, b) for a, b in zip(edges, edges[1:])]
        self.Q = edges[-1]  # columns of the stacked low-rank factors
        if self.low:
            self.VB, self.VAt = bank.stacked(names, self.low)
        self.slots = torch.tensor([slot[m] for m in names])
        self.sets = torch.tensor(self.low + self.dense)

    def scaling(self, device) -> torch.Tensor:
        """The LoRA modules' scalings s (L), kept on ``device`` after the first call."""
        if getattr(self, "_scale", None) is None or self._scale.device != torch.device(device):
            self._scale = torch.tensor([t.scaling for t in self.targets], device=device)
        return self._scale

    def low_factors(self, modules: int | list[int] | slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """``VB``, ``VAt`` of ``modules`` in fp32, the dtype the math runs in (a bf16 or fp16 set is held in its
        own dtype and upcast here, as it is used)."""
        return self.VB[modules].float(), self.VAt[modules].float()

    def block_sums(self, x: torch.Tensor) -> torch.Tensor:
        """(…×Q) → (…×low sets): the sum over each low-rank set's columns."""
        return torch.stack([x[..., c].sum(-1) for c in self.cols], -1)

    def put(self, dots: torch.Tensor, sq: torch.Tensor, into_dots: torch.Tensor, into_sq: torch.Tensor,
            modules: list[int] | slice | None = None) -> None:
        """Write the dots (…×L×sets) and squared norms (…×L) of the group's modules (or of its ``modules`` only)
        into (…×M×K) and (…×M) tensors."""
        if self.slots.device != dots.device:  # moved once: a host-to-device copy would wait for the device
            self.slots, self.sets = self.slots.to(dots.device), self.sets.to(dots.device)
        slots = self.slots if modules is None else self.slots[modules]
        into_dots[..., slots[:, None], self.sets[None, :]] = dots
        into_sq[..., slots] = sq


class HookGroup(Group):
    """A group as the hooks engine scores it: what one pass has gathered, and what it keeps for exact drops. Each
    layer kind's subclass (registered with the kind) adds ``hooks()`` (the model hooks that tap the backward pass),
    ``finish(record)`` (the group's dots and norms into the pass's record) and ``summed(target, kept, idx)`` (the
    summed gradients of examples ``idx``, in the parameters' layout)."""

    def __init__(self, engine, names: list[str], targets: dict[str, Target], bank: DirectionBank) -> None:
        super().__init__(names, targets, bank)
        self.engine = engine
        self.kept: list = [None] * len(names)

    def reset(self) -> None:
        """A new pass: nothing kept, no per-example products yet."""
        self.kept = [None] * len(self.targets)

    def write(self, record: Stats, dots: torch.Tensor, sq: torch.Tensor,
              modules: list[int] | slice | None = None) -> None:
        """Put the dots (L×n×sets) and squared norms (L×n) of the group's modules (or of its ``modules``) in the
        record."""
        self.put(dots.transpose(0, 1), sq.T, record.dots, record.sq, modules)

    def removed(self, idx: torch.Tensor):
        """Each kept module's parameters with the summed gradients of examples ``idx``; releases what was kept."""
        for target, kept in zip(self.targets, self.kept):
            if kept is not None:
                yield from zip(target.params, self.summed(target, kept, idx))
        self.kept = [None] * len(self.targets)


def group_modules(names, targets: dict[str, Target], bank: DirectionBank, make=Group) -> list:
    """Partition ``names`` into groups of one kind, each built by ``make(names, targets, bank)``."""
    kinds: dict[tuple, list[str]] = {}
    for m in names:
        t, dirs = targets[m], bank.per_module.get(m)
        kind = (type(t), t.shape, getattr(t, "rank", None), None if dirs is None else tuple(_layout(d) for d in dirs))
        kinds.setdefault(kind, []).append(m)
    return [make(ms, targets, bank) for ms in kinds.values()]
