"""Three interchangeable engines computing per-example dots and norms: ``hooks`` (fast, inside the training
step), ``vmap`` (torch.func per-example gradients) and ``loop`` (batch size 1, the paper's way)."""

from .hooks import HooksEngine
from .loop import LoopEngine
from .vmap import VmapEngine

ENGINES = {e.name: e for e in (HooksEngine, VmapEngine, LoopEngine)}


def make_engine(name: str, targets, bank, keep_grads: bool = False):
    """The engine called ``name`` for these targets and directions (``keep_grads``: hooks only, for drops)."""
    if name not in ENGINES:
        raise ValueError(f"Unknown engine {name!r}; choose one of {sorted(ENGINES)} ('hooks' is the fast one).")
    return ENGINES[name](targets, bank, keep_grads=True) if keep_grads else ENGINES[name](targets, bank)
