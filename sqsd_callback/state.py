"""The callback's state in a checkpoint, without pickle: tensors in a safetensors file whose header carries the rest
as JSON, written atomically (a temporary file, then a rename), so a run killed while saving leaves the previous
file or none, never a torn one."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

STATE_FILE = "sqsd_state.safetensors"


def save_state(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"sqsd": json.dumps(meta)})
    os.replace(tmp, path)


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a saved state; an unreadable file is an error that names it and the way out."""
    from safetensors import safe_open
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["sqsd"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several types for torn or foreign files
        raise ValueError(f"{path} is incomplete or not an SQSDCallback state ({type(err).__name__}: {err}); the "
                         f"run was probably killed while saving this checkpoint. Resume from an earlier checkpoint "
                         f"(resume_from_checkpoint=<its folder>) or delete this one.") from err
    return tensors, meta


def history_digest(log_history: list[dict]) -> str:
    """A fingerprint of the Trainer's log history, which a checkpoint's trainer_state.json restores: the state
    saved beside a checkpoint carries it, so a resume can tell that state from another run's."""
    return hashlib.sha256(json.dumps(log_history, sort_keys=True, default=str).encode()).hexdigest()


def split(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries under ``prefix/``, with the prefix taken off."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
