"""The training step as the monitor sees it: model hooks note each training micro-batch (its rows, its scored
tokens; an ``index`` input is taken out before the model sees it), open the engine's record, read each row's loss
weight off the backward pass (through the model's own loss, ``sum / num_items_in_batch`` or a mean, or TRL's
per-token ``log_probs``) and call ``on_backward(micro_batch)`` once that micro-batch's backward has finished,
before the Trainer clips gradients."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..engines.base import StepEngine
from ..types import IGNORE_INDEX, Batch, Segments, Stats, scored_tokens, targets_scored
from .distributed import after_backward

if TYPE_CHECKING:
    from .preference import PreferencePairs


def refuse_losses(args, model: nn.Module) -> list[str]:
    """Refuse, before the first step, a training loss whose per-example gradients are not those of the examples'
    mean cross-entropy that SQSD scores; returns warnings for what the scores follow as the step took it."""
    if getattr(args, "label_smoothing_factor", 0) > 0:
        raise ValueError(f"label_smoothing_factor={args.label_smoothing_factor}: the Trainer then takes the labels "
                         f"out of the batch and computes a smoothed loss, not the mean cross-entropy SQSD scores. "
                         f"Set label_smoothing_factor=0 to train with SQSDCallback.")
    if getattr(args, "loss_type", "nll") not in ("nll", "chunked_nll"):
        raise ValueError(f"loss_type={args.loss_type!r}: it weights each token by more than its count (DFT by its "
                         f"probability), so a step's per-example gradients are not those of the mean cross-entropy "
                         f"SQSD scores. Use loss_type='nll' (TRL's default) with SQSDCallback.")
    config = getattr(model, "config", None)
    if getattr(config, "output_router_logits", False) and getattr(config, "router_aux_loss_coef", 0):
        raise ValueError(f"The model adds its router's load-balancing loss to the loss (output_router_logits=True, "
                         f"router_aux_loss_coef={config.router_aux_loss_coef}); it couples the examples of a batch, "
                         f"so no example's gradient is its own. Set model.config.output_router_logits = False.")
    if getattr(args, "neftune_noise_alpha", None):
        return [f"neftune_noise_alpha={args.neftune_noise_alpha}: NEFTune adds noise to the input embeddings, so the "
                f"scores are those of the noisy step (as with dropout), not the batch-size-1 reference, and depend "
                f"on each batch's padded length. Train without NEFTune for reference scores."]
    return []


@dataclass
class MicroBatch:
    """One micro-batch: its rows, ``weight[b]`` (the loss weight each scored token of row b got, read off the
    backward pass; it scales hook gradients to batch-size-1 size) or, for DPO pairs, ``loss_share`` (each pair's
    share of the step's loss, set when the step ends), its stats and scored rows once known."""

    batch: Batch
    own_index: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    loss_share: float | None = None
    stats: Stats | None = None
    rows: list[dict] | None = None
    kept_tokens: int = 0
    recomputed: bool = False  # scored by an extra pass: the step's backward never reached the model's own loss

    def scale(self) -> torch.Tensor | None:
        """Per-row factor turning a hook gradient (loss weight w per token) into the example's mean-loss gradient:
        1 / (w · n_scored), or a pair's 1 / loss_share; None where the weights could not be read."""
        if self.loss_share is not None:
            return torch.full((self.batch.n_examples,), 1.0 / self.loss_share)
        if self.weight is None:
            return None
        w = self.weight * self.batch.n_scored.to(self.weight.device).float()
        return torch.where(w != 0, 1.0 / torch.where(w != 0, w, torch.ones_like(w)), torch.zeros_like(w))


UNSCORED_FIX = ("Check your collator (it must pass each example's response tokens through in `labels`; -100 marks "
                "only what is not trained), your completion-only masking (completion_only_loss / "
                "assistant_only_loss, the response template and the chat template; a prompt truncated past "
                "max_length leaves no response token) and your dataset's `labels` column.")


def unscored(step: list[MicroBatch], number: int) -> tuple[str, str] | None:
    """The warning (key, message) for optimizer step ``number`` when all of its micro-batches, or some, have no
    scored token (every label -100); None when each has one."""
    empty = [i for i, mb in enumerate(step) if int(mb.batch.n_scored.sum()) == 0]
    if not empty:
        return None
    if len(empty) == len(step):
        return "unscored", (f"No example of optimizer step {number} has a scored token: its labels are all -100, "
                            f"so the loss is 0, nothing is trained and every SQSD score is null. {UNSCORED_FIX}")
    mb = step[empty[0]]
    return "unscored micro-batch", (
        f"Micro-batch {empty[0] + 1} of {len(step)} in optimizer step {number} has no scored token: the labels of "
        f"its {mb.batch.n_examples} example(s) are all -100, so they add nothing to the step and their SQSD scores "
        f"are null. {UNSCORED_FIX}")


_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> the Recorder whose hooks are on it: a train() that was interrupted never detached its recorder."""


class Recorder:
    """Notes the training micro-batches of the current optimizer step (``pending``)."""

    def __init__(self, engine: StepEngine | None, on_backward: Callable[[MicroBatch], None],
                 pairs: PreferencePairs | None = None) -> None:
        self.engine, self.on_backward, self.pairs = engine, on_backward, pairs
        self.pending: list[MicroBatch] = []
        self._handles: list = []
        self._num_items = None

    def attach(self, model: nn.Module) -> None:
        """Hook the model, first taking off the hooks of a recorder an interrupted run left on it (they would
        score every later forward twice and keep its micro-batches)."""
        stale = _ATTACHED.pop(model, None)
        if stale is not None:
            stale.detach()
        if self.engine is not None:
            self.engine.attach()
        self._handles = [model.register_forward_pre_hook(self._on_forward, with_kwargs=True),
                         model.register_forward_hook(self._on_outputs, with_kwargs=True)]
        _ATTACHED[model] = self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        if self._handles and self.engine is not None:
            self.engine.detach()
        self._handles, self.pending = [], []

    def take(self) -> list[MicroBatch]:
        """The step's micro-batches, and a fresh list for the next step."""
        step, self.pending = self.pending, []
        if self.pairs is not None:
            self.pairs.weigh(step)
        return step

    def _on_forward(self, module, args, kwargs):
        if not module.training or not torch.is_grad_enabled():
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        labels = kwargs.get("labels")
        if ids is None or labels is None:
            raise ValueError("SQSDCallback needs input_ids and labels in each training batch (the examples' "
                             "scored tokens are the labels that are not -100). The Trainer takes the labels out "
                             "when it computes the loss itself (a compute_loss_func, label_smoothing_factor > 0): "
                             "let the model compute its own loss.")
        given = kwargs.get("attention_mask")
        if given is not None and given.dim() != 2:
            raise ValueError(
                f"SQSDCallback got a {given.dim()}-D attention mask (LLaMA-Factory's neat_packing builds one); it "
                f"reads which tokens are real and which example they belong to from a 2-D mask and position_ids. "
                f"Train without neat_packing, or pack as TRL does (position_ids and no attention_mask).")
        mask = torch.ones_like(ids) if given is None else given.detach()
        position_ids = kwargs.get("position_ids")
        segments = None if position_ids is None else Segments.from_position_ids(position_ids, mask)
        if segments is not None and given is not None:
            raise ValueError(
                "position_ids restart inside rows of this batch but an attention_mask came with it, so the packed "
                "examples attend to one another (transformers keeps them apart only when no attention_mask is "
                "passed) and no example's gradient is its own to score. This is LLaMA-Factory's `packing: true`; "
                "train without packing, or pack as TRL does (SFTConfig(packing=True): position_ids, no mask).")
        if self.pairs is not None:
            segments = self.pairs.segments(mask, packed=segments is not None)
        batch = Batch(ids.detach(), labels.detach(), mask, segments=segments)
        own_index = kwargs.pop("index", None)  # the dataset's own index column, where it reaches the batch
        if own_index is not None and segments is not None:
            raise ValueError("An `index` column cannot name the examples of packed rows; drop it from the batch "
                             "(SQSDCallback then finds each packed example by its tokens).")
        self.pending.append(MicroBatch(batch, own_index=own_index))
        self._num_items = kwargs.get("num_items_in_batch")
        if self.engine is not None:
            self.engine.start(batch)
        return args, kwargs

    def _on_outputs(self, module, args, kwargs, outputs):
        if not self.pending or not module.training or not torch.is_grad_enabled():
            return
        mb = self.pending[-1]
        labels = mb.batch.labels
        log_probs, loss = getattr(outputs, "log_probs", None), getattr(outputs, "loss", None)
        if isinstance(log_probs, torch.Tensor) and log_probs.requires_grad and log_probs.shape[0] == labels.shape[0]:
            shifted = log_probs.shape[1] == labels.shape[1] - 1
            scored = targets_scored(labels) if shifted else labels != IGNORE_INDEX
            tensor = log_probs

            def read_weights(g):  # the loss sums −log_probs over every position: read only scored ones
                if self.pairs is None:  # a pair's rows weigh its tokens by more than a count: see loss_share
                    tok = torch.zeros(labels.shape, device=g.device)
                    tok[:, labels.shape[1] - g.shape[1]:] = -g.detach().float() * scored.to(g.device)
                    mb.weight = mb.batch.sum_per_example(tok) / mb.batch.n_scored.to(g.device).clamp(min=1)
                self._queue(mb)
        elif isinstance(loss, torch.Tensor) and loss.requires_grad:
            denom = self._num_items if self._num_items is not None else scored_tokens(labels).sum()
            tensor = loss

            def read_weights(g):
                w = g.detach().float() / torch.as_tensor(denom, device=g.device).float()
                mb.weight = w.expand(mb.batch.n_examples)
                self._queue(mb)
        else:
            tensor = next((t for t in (getattr(outputs, "logits", None), loss, log_probs)
                           if isinstance(t, torch.Tensor) and t.requires_grad), None)
            if tensor is None:
                return

            def read_weights(g):
                self._queue(mb)
        tensor.register_hook(read_weights)

    def _queue(self, mb: MicroBatch) -> None:
        after_backward(lambda: self.on_backward(mb))
