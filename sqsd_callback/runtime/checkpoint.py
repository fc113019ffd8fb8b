"""The callback's state in a checkpoint, without pickle: tensors in a safetensors file whose header carries the rest
as JSON, written atomically (a temporary file, then a rename), so a run killed while saving leaves the previous
file or none, never a torn one."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..once import WarnOnce

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


def under(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries under ``prefix/``, with the prefix taken off."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}


def checkpoint_folder(output_dir: str | Path, step: int) -> Path:
    """The folder the Trainer saves optimizer step ``step``'s checkpoint in."""
    return Path(output_dir) / f"checkpoint-{step}"


class CheckpointState:
    """The monitor's state beside each checkpoint the Trainer writes, and found again when a run resumes: it carries
    the fingerprint of the Trainer history that checkpoint restores, so another run's state is refused, never
    loaded. Writing failures warn once and training goes on."""

    def __init__(self, warn: WarnOnce) -> None:
        self.warn = warn

    def save(self, args, state, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        ckpt = checkpoint_folder(args.output_dir, state.global_step)
        if not ckpt.is_dir():
            self.warn("no-checkpoint", f"SQSDCallback found no checkpoint folder {ckpt} to save its state in (a "
                      f"Trainer that saves elsewhere, e.g. hyperparameter search's run-* folders): a run resumed "
                      f"from this checkpoint cannot restore the monitor's state.")
            return
        try:
            save_state(ckpt / STATE_FILE, tensors, {**meta, "history": history_digest(state.log_history)})
        except OSError as err:  # a full disk must not end the run; resuming from this checkpoint will say so
            self.warn(f"state:{err.errno}", f"SQSDCallback could not write {ckpt / STATE_FILE} ({err}); training "
                      f"goes on, but this checkpoint cannot resume the monitor's state.")

    @staticmethod
    def find(args, state) -> tuple[dict[str, torch.Tensor], dict]:
        """The state saved with the checkpoint being resumed: the Trainer does not say which folder that is, so the
        state beside ``output_dir/checkpoint-<step>`` (or ``args.resume_from_checkpoint``) must carry the history
        that checkpoint restored."""
        given = getattr(args, "resume_from_checkpoint", None)
        folders = [*([Path(given)] if isinstance(given, str) else []),
                   checkpoint_folder(args.output_dir, state.global_step)]
        found = [f / STATE_FILE for f in folders if (f / STATE_FILE).is_file()]
        history = history_digest(state.log_history)
        for path in found:
            tensors, saved = load_state(path)
            if saved.get("history", history) == history:  # states saved before the fingerprint carry none
                return tensors, saved
        where = " or ".join(str(f / STATE_FILE) for f in folders)
        if found:
            raise ValueError(f"Resuming at step {state.global_step}, but {where} was saved by another run (its "
                             f"Trainer history differs from the checkpoint's being resumed). Resume from the "
                             f"checkpoint in output_dir, or pass its folder as TrainingArguments("
                             f"resume_from_checkpoint=...) too, so SQSDCallback finds its state.")
        raise FileNotFoundError(f"Resuming at step {state.global_step} but {where} is missing: the checkpoint was "
                                f"written by a run without SQSDCallback, the run was killed while saving it, or it "
                                f"lies outside output_dir (pass its folder as TrainingArguments("
                                f"resume_from_checkpoint=...) too). Resume from an earlier checkpoint, or start a "
                                f"new run (new output_dir).")
