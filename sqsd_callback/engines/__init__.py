"""Three interchangeable engines computing per-example dots and norms: ``hooks`` (fast, inside the training
step), ``vmap`` (torch.func per-example gradients) and ``loop`` (batch size 1, the paper's way)."""

from .base import Engine, OracleEngine, StepEngine
from .hooks import HooksEngine
from .loop import LoopEngine
from .vmap import VmapEngine

ENGINES = {e.name: e for e in (HooksEngine, VmapEngine, LoopEngine)}


def check_engine(name: str) -> str:
    if name not in ENGINES:
        raise ValueError(f"Unknown engine {name!r}; choose one of {sorted(ENGINES)} ('hooks' is the fast one).")
    return name


def make_engine(name: str, targets, bank, keep_grads: bool = False, model=None) -> Engine:
    """The engine called ``name`` for these targets and directions (``keep_grads``: hooks only, for drops); with
    ``model``, an engine that cannot run it says so now (``check``), before any pass."""
    cls = ENGINES[check_engine(name)]
    if model is not None:
        cls.check(model)
    return cls(targets, bank, keep_grads=keep_grads)


__all__ = ["ENGINES", "Engine", "OracleEngine", "StepEngine", "check_engine", "make_engine"]
