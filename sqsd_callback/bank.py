"""Several direction sets laid out for one model: validated against its trained modules, per module one Direction
(or None) per set, the directions' norms, and their low-rank factors stacked for the engines' and the drift's
batched algebra."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from .once import WarnOnce
from .types import Direction

if TYPE_CHECKING:
    from .directions import DirectionSet


class DirectionBank:
    """Several direction sets validated against one model and laid out per covered module: the engines read
    ``per_module[m]`` (one Direction or None per set), scoring reads ``v_norm`` and ``present`` (M×K)."""

    def __init__(self, sets: list[DirectionSet], shapes: Mapping[str, tuple[int, int]]) -> None:
        if not sets:
            raise ValueError("No direction sets given: pass danger=[DirectionSet(...)] and/or safety=[...].")
        names = [f"{s.kind}/{s.name}" for s in sets]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"Direction set names must be unique per kind; repeated: {sorted(dup)}. "
                             f"Pass name=... when loading.")
        matched = [set(s.match(shapes)) for s in sets]
        self.sets = sets
        self.keys = names
        self.modules = [m for m in shapes if any(m in mk for mk in matched)]
        self.per_module = {m: [s.modules[m] if m in mk else None for s, mk in zip(sets, matched)]
                           for m in self.modules}
        self.present = torch.tensor([[d is not None for d in self.per_module[m]] for m in self.modules])
        self.v_norm = torch.tensor(
            [[math.sqrt(d.sq_norm()) if d is not None else 0.0 for d in self.per_module[m]] for m in self.modules],
            dtype=torch.float64,
        )
        self._stacks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.warn = WarnOnce()

    def to(self, device) -> DirectionBank:
        """Move every direction to ``device`` once, before the first step, in its set's dtype (the engines compute in
        fp32: a bf16 set takes half the memory of an fp32 one)."""
        for m, dirs in self.per_module.items():
            self.per_module[m] = [None if d is None else d.to(device) for d in dirs]
        self._stacks = {}
        return self

    def stacked(self, modules: list[str], sets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The low-rank factors of ``sets`` (indices into ``sets``) for ``modules``, side by side and stacked over
        the modules: B_V (L×out×Q) and A_Vᵀ (L×in×Q). Made once per bank; the bank's per-module factors and the
        direction sets' own become views of them, so the engine, the drift, the bank and the sets hold one copy
        (the sets' earlier tensors are freed where nothing else holds them)."""
        key = (tuple(modules), tuple(sets))
        if key not in self._stacks:
            dtypes = {self.per_module[m][k].B.dtype for m in modules for k in sets}
            if len(dtypes) > 1:
                self.warn("mixed", f"Direction sets in different dtypes ({', '.join(sorted(map(str, dtypes)))}) "
                          f"are stacked together in the widest, so the narrower sets take its memory (their own "
                          f"tensors become views of the stack); give every set one dtype, e.g. "
                          f"set.to(dtype=torch.bfloat16), to hold them in half precision.", stacklevel=3)
            VB = torch.stack([torch.cat([self.per_module[m][k].B for k in sets], 1) for m in modules])
            VAt = torch.stack([torch.cat([self.per_module[m][k].A.T for k in sets], 1) for m in modules])
            for m, b, at in zip(modules, VB, VAt):
                col = 0
                for k in sets:
                    width = self.per_module[m][k].B.shape[1]
                    view = Direction(B=b[:, col:col + width], A=at[:, col:col + width].T)
                    self.per_module[m][k] = view
                    if self.sets[k].modules[m].B.device == view.B.device:  # the same values, now one copy
                        self.sets[k].modules[m] = view
                    col += width
            self._stacks[key] = (VB, VAt)
        return self._stacks[key]
