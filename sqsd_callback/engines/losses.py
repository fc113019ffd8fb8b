"""The losses the oracle and offline passes take: each example's own mean next-token cross-entropy, summed over a
batch (its gradient is the sum of the examples' batch-size-1 gradients), with the output layer run only where a
token is scored."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..bank import DirectionBank
from ..types import Batch, Stats, Target, targets_scored


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
        logits = model(**batch.model_inputs(), use_cache=False).logits  # a KV cache is memory no pass reads
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


@contextlib.contextmanager
def scoring_mode(model: nn.Module, targets: dict[str, Target]):
    """Eval mode (no dropout, no checkpoint recomputation) with the targets' weights differentiable; restores the
    model's modes and requires_grad flags on exit. Gradients are taken with autograd.grad, so ``.grad`` is untouched.

    bitsandbytes' 4-bit layers are kept off their AVX512-BF16 inference path meanwhile: on a CPU that has it, a
    Linear4bit repacks its weight in place at its first eval-mode forward on an input that needs no gradient, and
    from then on every forward, training's included, runs a bf16 kernel with no backward, so gradients through
    the base weights would be lost for the scores and for the training that follows."""
    modes = {m: m.training for m in model.modules()}
    packing = {m: m.support_avx512bf16_for_cpu for m in modes if hasattr(m, "support_avx512bf16_for_cpu")}
    params = [p for t in targets.values() for p in t.params]
    flags = [p.requires_grad for p in params]
    model.eval()
    for m in packing:
        m.support_avx512bf16_for_cpu = False
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        for m, mode in modes.items():
            m.training = mode
        for m, flag in packing.items():
            m.support_avx512bf16_for_cpu = flag


