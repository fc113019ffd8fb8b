"""The data the library's parts hand one another (a leaf module): the batch of examples, where packed examples lie,
the per-module quantities an engine returns, one direction matrix, and what a trained layer offers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

IGNORE_INDEX = -100
"""The label of a position that is not scored (the causal-LM loss's ignore_index)."""


def targets_scored(labels: torch.Tensor) -> torch.Tensor:
    """(rows × length−1) bool: whether position t's next-token target, ``labels[:, t+1]``, is scored. Every scored
    count and mask in the package derives from this one."""
    return labels[:, 1:] != IGNORE_INDEX


@dataclass
class Segments:
    """Where the examples of a packed batch lie: example i is flat token positions ``gather[i, :len_i]`` of the
    (rows × length) batch (``mask`` marks the real entries). Rows are split where ``position_ids`` restart at 0."""

    gather: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> Segments | None:
        """None when every row is one example (nothing packed)."""
        starts = (position_ids == 0) & attention_mask.bool()
        if int(starts.sum(-1).max()) <= 1:
            return None
        T = position_ids.shape[1]
        spans = []
        for row in range(position_ids.shape[0]):
            cut = torch.nonzero(starts[row]).flatten().tolist()
            end = int(attention_mask[row].sum()) if attention_mask[row].all() else int(
                torch.nonzero(attention_mask[row]).max()) + 1
            spans += [(row * T + a, row * T + b) for a, b in zip(cut, cut[1:] + [end])]
        L = max(b - a for a, b in spans)
        ar = torch.arange(L)
        gather = torch.stack([torch.clamp(a + ar, max=b - 1) for a, b in spans])
        mask = torch.stack([ar < b - a for a, b in spans])
        return cls(gather.to(position_ids.device), mask.to(position_ids.device))

    def by_example(self, x: torch.Tensor) -> torch.Tensor:
        """(rows × length × d) → (examples × max example length × d), zeros past each example's end."""
        flat = x.reshape(-1, x.shape[-1])
        return flat[self.gather] * self.mask[..., None].to(x.dtype)


@dataclass
class Batch:
    """A padded (or packed) batch of examples; ``labels == -100`` marks positions that are not scored."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    index: list[int | None] = field(default_factory=list)
    segments: Segments | None = None

    @property
    def n_examples(self) -> int:
        return self.input_ids.shape[0] if self.segments is None else self.segments.gather.shape[0]

    @property
    def n_scored(self) -> torch.Tensor:
        """Scored (next-token) positions per example, counted as the causal-LM loss counts them."""
        return self.sum_per_example(nn.functional.pad(targets_scored(self.labels).long(), (1, 0)))

    def sum_per_example(self, per_token: torch.Tensor) -> torch.Tensor:
        """Sum a (rows × length) per-token quantity over each example's tokens."""
        if self.segments is None:
            return per_token.sum(-1)
        return self.segments.by_example(per_token[..., None])[..., 0].sum(-1)

    def example_ids(self) -> list[torch.Tensor]:
        """Each example's token ids (padding removed)."""
        return self._per_example(self.input_ids)

    def example_labels(self) -> list[torch.Tensor]:
        """Each example's labels (padding removed), aligned with ``example_ids``."""
        return self._per_example(self.labels)

    def _per_example(self, t: torch.Tensor) -> list[torch.Tensor]:
        """A (rows × length) per-token tensor as one 1-D tensor per example, padding removed."""
        if self.segments is None:
            return [row[m.bool()] for row, m in zip(t, self.attention_mask)]
        examples = self.segments.by_example(t[..., None])[..., 0]
        return [row[m] for row, m in zip(examples, self.segments.mask)]

    def one_per_row(self) -> Batch:
        """One example per row, its tokens first and padding after: causal attention then never reaches the
        padding, so a model needs no mask for it (the form the oracle engines run)."""
        pad = nn.utils.rnn.pad_sequence
        ids, labels = self._per_example(self.input_ids), self._per_example(self.labels)
        mask = [torch.ones_like(i) for i in ids]
        return Batch(pad(ids, batch_first=True), pad(labels, batch_first=True, padding_value=IGNORE_INDEX),
                     pad(mask, batch_first=True), self.index)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Inputs whose positions do not depend on the padding side (position ids from the attention mask)."""
        position_ids = (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": position_ids}

    def to(self, device) -> Batch:
        segments = None if self.segments is None else Segments(self.segments.gather.to(device),
                                                                self.segments.mask.to(device))
        return Batch(self.input_ids.to(device), self.labels.to(device), self.attention_mask.to(device), self.index,
                     segments)


def scored_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Per row, how many next-token targets are scored."""
    return targets_scored(labels).sum(-1)


@dataclass
class Stats:
    """Per example i and module m: ``dots[i, m, k] = <ΔW_i,m, V_m,k>`` for each direction set k and
    ``sq[i, m] = ‖ΔW_i,m‖²``, where ΔW_i is the example's first-order weight update (fp32)."""

    dots: torch.Tensor
    sq: torch.Tensor


@dataclass
class Direction:
    """V for one module: ``dense`` (out×in), or ``B @ A`` with ``B`` (out×k) and ``A`` (k×in)."""

    dense: torch.Tensor | None = None
    B: torch.Tensor | None = None
    A: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        if self.dense is not None:
            return tuple(self.dense.shape)
        return (self.B.shape[0], self.A.shape[1])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.dense, self.B, self.A) if t is not None]

    def sq_norm(self) -> float:
        """‖V‖²_F, from the k×k Gram matrices when V is low-rank (never forms out×in); contiguous copies, so that
        the value does not depend on whether the factors are views of an engine's stack."""
        if self.dense is not None:
            return float(self.dense.double().pow(2).sum())
        B, A = self.B.double().contiguous(), self.A.double().contiguous()
        return float(((B.T @ B) * (A @ A.T)).sum())

    def same_as(self, other: Direction) -> bool:
        """Whether both hold the same stored tensors (the same adapter loaded twice)."""
        mine, theirs = self.tensors(), other.tensors()
        return len(mine) == len(theirs) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(mine, theirs))

    def materialize(self) -> torch.Tensor:
        """Dense V (out×in), at least fp32 (a product of bf16 factors is formed in fp32). For oracles and small
        models only."""
        return self.dense.float() if self.dense is not None else self.B.float() @ self.A.float()

    def times_right(self, M: torch.Tensor) -> torch.Tensor:
        """V @ M for M (in×r), through the factors when V is low-rank; in M's dtype."""
        if self.dense is not None:
            return self.dense.to(M.dtype) @ M
        return self.B.to(M.dtype) @ (self.A.to(M.dtype) @ M)

    def times_left(self, M: torch.Tensor) -> torch.Tensor:
        """M @ V for M (r×out), through the factors when V is low-rank; in M's dtype."""
        if self.dense is not None:
            return M @ self.dense.to(M.dtype)
        return (M @ self.B.to(M.dtype)) @ self.A.to(M.dtype)

    def to(self, device=None, dtype=None) -> Direction:
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)
        return Direction(move(self.dense), move(self.B), move(self.A))


def collate(samples: list[dict], pad_id: int = 0) -> Batch:
    """Right-pad samples (dicts with ``input_ids``, ``labels``, optional ``attention_mask`` and ``index``)."""
    for i, s in enumerate(samples):
        missing = [k for k in ("input_ids", "labels") if k not in s]
        if missing:
            raise ValueError(f"Sample {i} has no {missing}: each sample needs input_ids and labels "
                             f"(-100 where a token is not scored).")
        if len(s["labels"]) != len(s["input_ids"]):
            raise ValueError(f"Sample {i}: labels ({len(s['labels'])}) and input_ids ({len(s['input_ids'])}) "
                             f"differ in length.")
    T = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), T), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.as_tensor(s["input_ids"])
        labels[i, :n] = torch.as_tensor(s["labels"])
        mask[i, :n] = torch.as_tensor(s["attention_mask"]) if "attention_mask" in s else 1
    return Batch(ids, labels, mask, [s.get("index") for s in samples])


class Target(Protocol):
    """A trained layer as the engines, the drift and the policies see it (one class per layer kind, registered in
    ``sqsd_callback.layers``): its trained parameters, the out×in shape of its weight update, the oracles'
    per-example update from parameter gradients, and the snapshot the drift starts from."""

    name: str
    module: nn.Module

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def params(self) -> tuple[torch.Tensor, ...]: ...

    def update(self, *grads: torch.Tensor) -> torch.Tensor: ...

    def snapshot(self, sample: int = 1): ...
