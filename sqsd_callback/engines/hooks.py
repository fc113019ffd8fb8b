"""Per-example scores from the step's own backward pass, never forming a per-example out×in gradient.

A tap on a layer's output receives the layer's input, saved the way the layer saves it (so gradient
checkpointing frees and recomputes it), and its output gradient. Modules of one kind (e.g. every layer's q_proj:
same shape, LoRA rank and direction layout) form a group whose direction products are stacked over its layers:
a tap does a few batched products for its own module and the rest runs once per group per pass, so the Python
and kernel-launch cost per module stays at a handful of operations.

Each layer kind's math (its group class: the hooks it sets, what a tap computes, what a pass's end computes, the
gradient edit for drops) lives with the kind in ``sqsd_callback.layers``; this module is the machinery they share:
the tap, the record of a pass, packed-batch splitting and shared Gram matrices.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function

from ..bank import DirectionBank
from ..groups import group_modules
from ..layers import kind_of
from ..once import WarnOnce
from ..types import Batch, Stats, Target
from .base import StepEngine
from .losses import output_layer, scoring_mode, summed_example_losses


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


class HooksEngine(StepEngine):
    """Scores every example of each forward/backward pass the model runs while attached.

    With ``keep_grads`` it also keeps, for every target (not only those with directions), what it needs to
    give any examples' summed gradients afterwards (``removed``): what exact removal from the update needs.
    """

    name = "hooks"

    def __init__(self, targets: dict[str, Target], bank: DirectionBank, keep_grads: bool = False) -> None:
        super().__init__(targets, bank, keep_grads)
        self.groups = group_modules(targets if keep_grads else bank.modules, targets, bank,
                                    make=lambda names, *args: kind_of(targets[names[0]]).hooks(self, names, *args))
        self.handles: list = []
        self.record: Stats | None = None
        self.segments = None
        self._grams: list = []
        self.tap_names: list[str] = []     # every tapped layer, by target name
        self.tapped: set[str] = set()       # those whose forward ran in the current pass
        self.warn = WarnOnce()
        self._head = None                   # (output layer, chunked) for offline passes, found at the first

    # -------------------------------------------------------------- lifecycle
    def attach(self) -> None:
        if self.handles:
            return
        self.tap_names = []
        for group in self.groups:
            self.handles += group.hooks()

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def start(self, batch: Batch) -> None:
        """Open a record for the next pass over ``batch``'s examples: one per row, or where its ``segments``
        (a packed batch's :class:`Segments`) say."""
        K, M, n, device = len(self.bank.sets), len(self.bank.modules), batch.n_examples, batch.input_ids.device
        self.record = Stats(torch.zeros(n, M, K, device=device), torch.zeros(n, M, device=device))
        self.segments, self._grams, self.tapped = batch.segments, [], set()
        for group in self.groups:
            group.reset()

    def finish(self) -> Stats:
        """Close the current record and return it. A pass in which no tapped layer ran its forward is an error: the
        model computes them through fused kernels that bypass the modules (unsloth's fast LoRA, for one), and every
        score would silently be 0."""
        self._check_tapped()
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

    def tap(self, name: str, fn, saved_before=tuple):
        """A forward hook (for target ``name``) whose backward calls ``fn(*saved_before(), layer input, output
        gradient)``."""
        self.tap_names.append(name)

        def backward(*args):
            if self.record is not None:
                fn(*args)

        def hook(module, args, out):
            if self.recording(out):
                self.tapped.add(name)
                return _Tap.apply(out, backward, *saved_before(), args[0])
        return hook

    def _check_tapped(self) -> None:
        missing = [n for n in self.tap_names if n not in self.tapped]
        if not missing:
            return
        if len(missing) == len(self.tap_names):
            raise RuntimeError(
                "No trained layer ran its forward as a module in this training pass, so SQSD saw none of its "
                "gradients (every score would be 0): the model computes its LoRA or Linear layers through fused "
                "kernels that bypass the modules, as unsloth's fast LoRA kernels do. Train with the layers running "
                "as PEFT / torch modules (for unsloth, with its fused LoRA kernels off), or score offline with "
                "`sqsd score`.")
        # e.g. mixture-of-experts layers no token was routed to
        self.warn("untapped", f"{len(missing)} of {len(self.tap_names)} trained layers did not run as modules in a "
                          f"training pass (e.g. {missing[:3]}): their per-example gradients count as 0 there. "
                          f"Expected for experts no token was routed to; otherwise a fused kernel bypasses them.")

    # -------------------------------------------------------------- shared math
    def tokens(self, t: torch.Tensor) -> torch.Tensor:
        """Activations (rows × length × d) as (examples × tokens × d), fp32."""
        if self.segments is not None:
            return self.segments.by_example(t.float())
        return t.reshape(self.record.sq.shape[0], -1, t.shape[-1]).float()

    def per_example(self, grad: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        """Σ over each example's tokens of grad_t inp_tᵀ: (n × grad-dim × inp-dim), fp32."""
        return torch.bmm(self.tokens(grad).transpose(1, 2), self.tokens(inp))

    def gram(self, raw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x xᵀ per example (n×T×T) for ``x``, the layer input ``raw`` as ``tokens`` gives it. Layers reading the
        same input tensor share one; the last two inputs are held so that their memory cannot be reused meanwhile."""
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
        try:
            with scoring_mode(model, self.targets) as params:
                if self._head is None:
                    self._head = output_layer(model, self.targets)
                self.attach()
                self.start(batch)
                torch.autograd.grad(summed_example_losses(model, batch, *self._head), params, allow_unused=True)
                return self.finish()
        finally:
            self.record = None
            if not was_attached:
                self.detach()
