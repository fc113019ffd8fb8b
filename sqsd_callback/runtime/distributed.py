"""What several processes need: which backend spreads the model (DDP, FSDP, DeepSpeed), the one set of decisions
every rank takes, and gradient corrections made after the backend's reduction.

DDP averages gradients inside the backward pass and writes the averages into ``.grad`` in a callback of its own at
the pass's end; an edit made before that is overwritten. FSDP2 reduce-scatters them in the pass too and hands each
rank its shard in its own end-of-pass callback (and, under ``no_sync``, accumulates in buffers of its own, out of
reach). By linearity an edit after that is exact: subtracting (1/W)·Σ_ranks of the ranks' own removed gradients
from the averaged gradient (each rank its shard of it) equals removing them before.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    """The processes of a run: ``world`` of them, this one ``rank``, spread by ``backend`` (``"single"``,
    ``"ddp"``, ``"fsdp"``, ``"deepspeed"``) with ``fsdp_version`` or ``zero_stage`` where they apply."""

    world: int = 1
    rank: int = 0
    backend: str = "single"
    fsdp_version: int | None = None
    zero_stage: int | None = None

    @classmethod
    def current(cls) -> Processes:
        """Read off accelerate's state (which the Trainer set up) and torch.distributed."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        world, rank = dist.get_world_size(), dist.get_rank()
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType
        state = AcceleratorState._shared_state  # read, not re-made: AcceleratorState() copies PartialState's
        kind = state.get("distributed_type")   # distributed_type over it again
        if kind == DistributedType.FSDP:
            plugin = state.get("fsdp_plugin")
            return cls(world, rank, "fsdp", fsdp_version=getattr(plugin, "fsdp_version", 1) if plugin else 1)
        if kind == DistributedType.DEEPSPEED:
            plugin = state.get("deepspeed_plugins", state.get("deepspeed_plugin"))  # accelerate < 1.1: one plugin
            if isinstance(plugin, dict):  # several: the one selected
                plugin = next((p for p in plugin.values() if getattr(p, "selected", False)), None)
            stage = plugin.deepspeed_config.get("zero_optimization", {}).get("stage") if plugin else None
            return cls(world, rank, "deepspeed", zero_stage=stage)
        return cls(world, rank, "ddp" if world > 1 else "single")

    @property
    def reduces_in_backward(self) -> bool:
        """Whether gradients are averaged across processes inside the backward pass (DDP, FSDP2)."""
        return self.backend in ("ddp", "fsdp")

    @property
    def holds_edits(self) -> bool:
        """Whether every micro-batch's gradient edits wait for the step's reduction: FSDP2 keeps a ``no_sync``
        micro-batch's gradients in buffers of its own, where only its reduction reaches them."""
        return self.backend == "fsdp"

    def gather(self, items: list) -> list:
        """Every process's items, in rank order."""
        if self.world == 1:
            return items
        parts = [None] * self.world
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Element-wise sums over the processes, in one all-reduce of one flat buffer."""
        if self.world == 1 or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def after_reduction(self, fn) -> None:
        """From a running backward-pass callback: run ``fn`` once the step's gradients are complete. Under DDP that is
        after every callback the pass has queued (DDP's reducer queues the one that writes the averaged gradients
        to ``.grad`` while the pass runs; the autograd engine runs callbacks queued by a running callback after
        those already queued); otherwise now."""
        if self.reduces_in_backward:
            after_backward(fn)
        else:
            fn()


def after_backward(fn) -> None:
    """Run ``fn`` when the backward pass now running has finished (an autograd-engine callback); queued from a
    running callback, after the callbacks the pass has queued already."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def step_ends_now() -> bool:
    """Whether the micro-batch now in its backward pass is the optimizer step's last (accelerate's
    ``sync_gradients``, which the Trainer sets for it)."""
    from accelerate.state import GradientState
    return bool(GradientState().sync_gradients)


def grads_reduced_now() -> bool:
    """Whether the micro-batch now in its backward pass is one whose gradients DDP reduces: the step's last (the
    Trainer runs the others under ``no_sync``), or every one with accelerate's ``sync_each_batch``."""
    from accelerate.state import GradientState
    return step_ends_now() or bool(GradientState().plugin_kwargs.get("sync_each_batch", False))


@torch.no_grad()
def add_to_grad(p: torch.Tensor, g: torch.Tensor, alpha: float = 1.0) -> None:
    """``p.grad += alpha·g`` for a whole-parameter ``g``; where FSDP2 shards ``p`` its gradient is a shard, and this
    rank adds its own part of ``g`` (the same on every rank: no communication). A missing ``.grad`` is created."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(p, DTensor):
        g = distribute_tensor(g.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
    g = g.to(p.grad.dtype if p.grad is not None else p.dtype)
    if p.grad is None:
        p.grad = alpha * g
    else:
        p.grad.add_(g, alpha=alpha)


def is_sharded(p: torch.Tensor) -> bool:
    """Whether a parameter is split across processes: an FSDP2 DTensor or a DeepSpeed ZeRO-3 partition."""
    from torch.distributed.tensor import DTensor
    return isinstance(p, DTensor) or hasattr(p, "ds_id")


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module, params: list[torch.Tensor]):
    """Within: ``params`` hold their full values (read only), however FSDP2 or ZeRO-3 shard them; a collective, so
    every process enters it at the same point. Outside a forward or backward pass only. Only ``params`` are
    gathered: an FSDP2 shard is gathered into a whole copy that stands in for it on its module until the context
    ends (the module's ``unshard()`` would gather every parameter it holds, frozen base weights included)."""
    from torch.distributed.tensor import DTensor
    zero = [p for p in params if hasattr(p, "ds_id")]
    wanted = {id(p) for p in params if isinstance(p, DTensor)}
    held = [(m, name, p) for m in model.modules() for name, p in m._parameters.items()
            if p is not None and id(p) in wanted] if wanted else []
    with contextlib.ExitStack() as stack:
        if zero:
            import deepspeed
            stack.enter_context(deepspeed.zero.GatheredParameters(zero, modifier_rank=None))
        for m, name, p in held:  # the same order on every process: model.modules() is
            stack.callback(m._parameters.__setitem__, name, p)
            m._parameters[name] = torch.nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)
        yield


def refuse_unsupported(procs: Processes, edits_gradients: bool, engine: str, in_step: bool) -> None:
    """Refuse, before the first step, what the run's multi-process backend cannot do exactly (``engine``: the scoring
    engine's name; ``in_step``: whether it scores the step's own passes)."""
    if procs.backend == "fsdp" and procs.fsdp_version != 2:
        raise ValueError("SQSDCallback does not support FSDP1 (FullyShardedDataParallel's flat parameters hide "
                         "the LoRA factors from the scoring taps). Use FSDP2: fsdp_version: 2 in the accelerate "
                         "config, or TrainingArguments(fsdp_config={'fsdp_version': 2}).")
    if procs.backend == "deepspeed" and edits_gradients:
        raise ValueError(f"Drops and the anchor edit the step's gradients between their reduction and the "
                         f"optimizer, but DeepSpeed ZeRO-{procs.zero_stage} reduces, clips and steps inside one "
                         f"call (accelerate's backward runs the engine's step), leaving no such point; under "
                         f"DeepSpeed they are not supported. Monitoring (scores, drift, stop_drift_above) works; for "
                         f"drops or the anchor train with FSDP2 (fsdp_version: 2), DDP or one process.")
    if procs.backend in ("fsdp", "deepspeed") and not in_step:
        raise ValueError(f"engine={engine!r} runs extra passes outside the training step, which "
                         f"FSDP2 and DeepSpeed do not shard for it; use engine='hooks' (the default).")
