"""Per-example LoRA factor gradients with torch.func (vmap over examples of grad), then the dense reference
math. An oracle: it materialises every example's gradient, so it is for small models and tests."""

from __future__ import annotations

import contextlib

from torch import nn
from torch.func import functional_call, grad, vmap

from ..types import Batch, Stats
from .base import OracleEngine
from .losses import dense_stats, example_mean_losses, scoring_mode


@contextlib.contextmanager
def _without_input_grad_hooks(model: nn.Module):
    """Lift transformers' ``make_inputs_require_grads`` hooks (set for PEFT with gradient checkpointing): they call
    ``requires_grad_`` on the embeddings' output, which torch.func transforms refuse. vmap's gradients do not
    need them."""
    lifted = [(m._forward_hooks, k, h) for m in model.modules() for k, h in list(m._forward_hooks.items())
              if getattr(h, "__name__", "") == "make_inputs_require_grads"]
    for hooks, k, _ in lifted:
        del hooks[k]
    try:
        yield
    finally:
        for hooks, k, h in lifted:
            hooks[k] = h


class VmapEngine(OracleEngine):
    name = "vmap"

    @staticmethod
    def check(model: nn.Module) -> None:
        """torch.func cannot trace bitsandbytes' quantized layers (autograd Functions without ``setup_context``)."""
        quantized = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("bitsandbytes")})
        if quantized:
            raise ValueError(f"engine='vmap' cannot run a model with bitsandbytes layers ({', '.join(quantized)}): "
                             f"torch.func does not trace them. Use engine='hooks' (or 'loop', the reference).")

    def compute(self, model: nn.Module, batch: Batch) -> Stats:
        names = {id(p): n for n, p in model.named_parameters()}
        keys = {m: [names[id(p)] for p in self.targets[m].params] for m in self.bank.modules}
        # tokens first, then no mask or position ids: transformers branches on their values, which vmap cannot
        batch = batch.one_per_row()

        def loss(params, ids, labels):
            out = functional_call(model, params, args=(), kwargs={"input_ids": ids[None]})
            return example_mean_losses(out.logits, labels[None])[0]

        with scoring_mode(model, self.targets), _without_input_grad_hooks(model):
            params = {k: p.detach() for m in self.bank.modules for k, p in zip(keys[m], self.targets[m].params)}
            g = vmap(grad(loss), in_dims=(None, 0, 0))(params, batch.input_ids, batch.labels)
        return dense_stats({m: tuple(g[k] for k in ks) for m, ks in keys.items()}, self.targets, self.bank)
