"""What every engine shares: the batch it scores, the per-module quantities it returns, and the reference math."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..directions import DirectionBank
from ..layers import Target

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

    def split(self, x: torch.Tensor) -> torch.Tensor:
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
        return self.segments.split(per_token[..., None])[..., 0].sum(-1)

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
        split = self.segments.split(t[..., None])[..., 0]
        return [row[m] for row, m in zip(split, self.segments.mask)]

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


def example_mean_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's mean next-token cross-entropy over its scored tokens (0 where it has none): summed over
    a batch, its gradient is the sum of the examples' batch-size-1 gradients."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    tok = nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
    mask = targets_scored(labels).float()
    return (tok * mask).sum(-1) / mask.sum(-1).clamp(min=1)


HEAD_CHUNK_BYTES = 2**28
"""Scored positions' logits (fp32) are formed at most this many bytes at a time, so offline scoring's memory does not
grow with scored tokens × vocabulary."""


def summed_example_losses(model: nn.Module, batch: Batch, head: nn.Module | None = None,
                          chunked: bool = False) -> torch.Tensor:
    """Σ_i of example i's mean next-token cross-entropy, from one forward of the batch (its gradient is the sum of
    the examples' batch-size-1 gradients). With ``head`` (the model's output layer, when no scored parameter is in
    it), that layer runs only at the scored positions: it is most of a small model's compute, and prompt and
    padding positions need none of it; ``chunked`` (where the model's logits are the layer's output unchanged:
    ``output_layer`` says) takes the loss and its gradient a chunk of positions at a time (:class:`_HeadLoss`)."""
    scored = nn.functional.pad(targets_scored(batch.labels), (0, 1))  # at the positions whose logits are scored
    rows, cols = scored.nonzero(as_tuple=True)
    hidden = []

    def gather(module, args):
        if args[0].shape[:2] == scored.shape:  # (rows × length × hidden): the whole sequence reaches the head
            hidden.append(args[0][rows, cols])
            return (hidden[0][:0 if chunked else None][None], *args[1:])

    handle = head.register_forward_pre_hook(gather) if head is not None else None
    try:
        logits = model(**batch.model_inputs()).logits
    finally:
        if handle is not None:
            handle.remove()
    if not hidden:
        return example_mean_losses(logits, batch.labels).sum()
    target, weight = batch.labels[rows, cols + 1], 1.0 / batch.n_scored[rows]
    if not chunked:
        return (nn.functional.cross_entropy(logits[0].float(), target, reduction="none") * weight).sum()
    return _HeadLoss.apply(hidden[0], head, target, weight.float())


class _HeadLoss(torch.autograd.Function):
    """Σ_j w_j·CE(head(h_j), t_j) over the scored positions, with its gradient for h formed in the forward, a chunk
    of positions at a time (dCE/dlogits = softmax − one-hot, sent back through the head): a chunk's logits are
    freed before the next is formed and the backward recomputes nothing. The head's own backward is used, so any
    output layer (quantized ones too) works."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, head: nn.Module, target: torch.Tensor, weight: torch.Tensor):
        step = max(1, HEAD_CHUNK_BYTES // (4 * getattr(head, "out_features", head.weight.shape[0])))
        grad, total = torch.empty_like(hidden), hidden.new_zeros((), dtype=torch.float32)
        for a in range(0, len(target), step):
            h, t, w = hidden[a:a + step].detach().requires_grad_(), target[a:a + step], weight[a:a + step]
            with torch.enable_grad():
                logits = head(h)
            logp = torch.log_softmax(logits.detach().float(), -1)
            total -= (w * logp.gather(-1, t[:, None])[:, 0]).sum()
            p = logp.exp_()
            p[torch.arange(len(t), device=p.device), t] -= 1
            # the head acts on each position alone, so w scales its backward's rows after the fact
            grad[a:a + step] = torch.autograd.grad(logits, h, p.to(logits.dtype))[0].float() * w[:, None]
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return g * grad, None, None, None


def output_layer(model: nn.Module, targets: dict[str, Target]) -> tuple[nn.Module | None, bool]:
    """(the output layer ``summed_example_losses`` may run at scored positions only, or None where a scored
    parameter is in it; whether its logits can be chunked: the model's logits are its output unchanged, with no
    soft-capping or scaling after it as Gemma 2 and Cohere apply, checked on one token (id 1: id 0 is often
    padding, whose zero embedding hides a soft cap) without gradients)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    scored = {id(p) for t in targets.values() for p in t.params}
    if head is None or any(id(p) in scored for p in head.parameters()):
        return None, False
    seen = []
    handle = head.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.ones(1, 1, dtype=torch.long, device=head.weight.device)).logits
    finally:
        handle.remove()
    plain = bool(seen) and seen[-1].shape == logits.shape and torch.equal(seen[-1].to(logits.dtype), logits)
    return head, plain


def dense_stats(grads: dict[str, tuple[torch.Tensor, ...]], targets: dict[str, Target], bank: DirectionBank) -> Stats:
    """Reference math from per-example parameter gradients (one tensor per target parameter, leading dim n):
    forms each ΔW_i densely (``target.update``) and takes plain dot products. For the oracle engines."""
    dots, sqs = [], []
    for m in bank.modules:
        dW = targets[m].update(*grads[m])
        V = torch.stack([torch.zeros_like(dW[0]) if d is None else d.materialize().double().to(dW.device)
                         for d in bank.per_module[m]])
        dots.append(torch.einsum("noi,koi->nk", dW, V))
        sqs.append(dW.pow(2).sum((1, 2)))
    return Stats(torch.stack(dots, 1).float(), torch.stack(sqs, 1).float())


class Engine:
    """What the callback and offline scoring ask of an engine: per-example ``Stats`` for a batch of examples.

    An engine that scores inside the training step (``from_step``: ``hooks``) is attached to the model for the run,
    opens a record at each training micro-batch's forward (``start``) and closes it when that micro-batch's
    backward has finished (``finish``); its stats are in the units of the step's own loss weights. The oracle
    engines score with extra passes at the current parameters (``compute``), where the callback calls it before
    the optimizer step; for them ``attach``, ``start`` and ``finish`` do nothing."""

    name: str = ""
    from_step: bool = False

    def __init__(self, targets: dict[str, Target], bank: DirectionBank) -> None:
        self.targets, self.bank = targets, bank

    @staticmethod
    def check(model: nn.Module) -> None:
        """Refuse, before any pass, a model this engine cannot run (nothing to refuse by default)."""

    def attach(self) -> None:
        """Set the model hooks a run needs (none for the oracles)."""

    def detach(self) -> None:
        """Remove them."""

    def start(self, batch: Batch) -> None:
        """A training micro-batch's forward begins."""

    def finish(self) -> Stats | None:
        """Its backward has finished: its stats, or None where they come from ``compute``."""
        return None

    def compute(self, model: nn.Module, batch: Batch) -> Stats:
        """Stats of ``batch`` from passes of the engine's own at the current parameters (each example's loss its
        own mean: the batch-size-1 reference)."""
        raise NotImplementedError

    def removed(self, idx: torch.Tensor):
        """Parameters with the summed gradients of examples ``idx`` of the last training pass (exact drops)."""
        raise NotImplementedError(f"engine={self.name!r} keeps no per-example gradients; drops need 'hooks'.")


@contextlib.contextmanager
def scoring_mode(model: nn.Module, targets: dict[str, Target]):
    """Eval mode (no dropout, no checkpoint recomputation) with the targets' weights differentiable; restores the
    model's modes and requires_grad flags on exit. Gradients are taken with autograd.grad, so ``.grad`` is untouched."""
    modes = {m: m.training for m in model.modules()}
    params = [p for t in targets.values() for p in t.params]
    flags = [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        for m, mode in modes.items():
            m.training = mode


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
