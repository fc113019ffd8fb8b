"""The callback's state in a checkpoint, without pickle: tensors in a safetensors file whose header carries the rest
as JSON, written atomically (a temporary file, then a rename), so a run killed while saving leaves the previous
file or none, never a torn one. The latest state is kept in the run's folder too, where the Trainer's checkpoint
rotation (``save_total_limit``) cannot delete it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from transformers.utils import logging

from ..once import WarnOnce

STATE_FILE = "sqsd_state.safetensors"
LATEST_FILE = "latest_state.safetensors"
"""The latest state, in the run's folder (``<output_dir>/sqsd/``)."""
logger = logging.get_logger(__name__)


def save_state(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a state atomically; a failed write (a full disk) is an OSError."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a new file, never one written through a hard link an earlier save left
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"sqsd": json.dumps(meta)})
    except SafetensorError as err:  # how safetensors reports its I/O errors
        raise OSError(f"{err}") from err
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
    the fingerprint of the Trainer history that checkpoint restores and its step, so another run's state is refused,
    never loaded. The latest state is kept at ``latest`` too (``<output_dir>/sqsd/latest_state.safetensors``): the
    Trainer deletes old checkpoints (``save_total_limit``) before its ``on_save`` event, so a run killed while this
    writes the newest checkpoint's state would otherwise leave no checkpoint with one. Writing failures warn once and
    training goes on."""

    def __init__(self, warn: WarnOnce, latest: str | Path | None = None) -> None:
        self.warn = warn
        self.latest = None if latest is None else Path(latest)

    def save(self, args, state, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Write the latest state, then the checkpoint's copy (a hard link to it where the filesystem allows), each
        atomically: from the moment the latest state is in place, a kill leaves a state this checkpoint can resume
        with, whatever becomes of its own copy."""
        ckpt = checkpoint_folder(args.output_dir, state.global_step)
        if not ckpt.is_dir():
            self.warn("no-checkpoint", f"SQSDCallback found no checkpoint folder {ckpt} to save its state in (a "
                      f"Trainer that saves elsewhere, e.g. hyperparameter search's run-* folders): a run resumed "
                      f"from this checkpoint cannot restore the monitor's state.")
            return
        meta = {**meta, "history": history_digest(state.log_history), "step": state.global_step}
        latest = False
        if self.latest is not None:
            try:
                save_state(self.latest, tensors, meta)
                latest = True
            except OSError as err:
                self.warn(f"latest:{err.errno}", f"SQSDCallback could not write {self.latest} ({err}); training "
                          f"goes on, but a checkpoint whose own copy of the state is lost (a run killed while "
                          f"saving it) cannot resume the monitor's state.")
        try:
            if not (latest and self._link_latest(ckpt / STATE_FILE)):
                save_state(ckpt / STATE_FILE, tensors, meta)
        except OSError as err:  # a full disk must not end the run; resuming from this checkpoint will say so
            resumes = f"can resume the monitor's state only from {self.latest}, until the next save replaces " \
                      f"it" if latest else "cannot resume the monitor's state"
            self.warn(f"state:{err.errno}", f"SQSDCallback could not write {ckpt / STATE_FILE} ({err}); training "
                      f"goes on, but this checkpoint {resumes}.")

    def _link_latest(self, path: Path) -> bool:
        """Make ``path`` a hard link to the latest state, just written (atomically: a temporary link, then a
        rename); False where the filesystem cannot link (another device, no hard links)."""
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.unlink(missing_ok=True)
            os.link(self.latest, tmp)
        except OSError:
            return False
        os.replace(tmp, path)  # the next save replaces the latest state by a new file: this one keeps its contents
        return True

    def find(self, args, state) -> tuple[dict[str, torch.Tensor], dict]:
        """The state saved with the checkpoint being resumed: the Trainer does not say which folder that is, so the
        state beside ``output_dir/checkpoint-<step>`` (or ``args.resume_from_checkpoint``) must carry the history
        that checkpoint restored. Where that copy is missing or torn, the latest state stands in for it if it was
        saved at the same step with the same history."""
        given = getattr(args, "resume_from_checkpoint", None)
        folders = [*([Path(given)] if isinstance(given, str) else []),
                   checkpoint_folder(args.output_dir, state.global_step)]
        found = [f / STATE_FILE for f in folders if (f / STATE_FILE).is_file()]
        history = history_digest(state.log_history)
        torn = foreign = None
        for path in found:
            try:
                tensors, saved = load_state(path)
            except ValueError as err:
                torn = torn or err
                continue
            if saved.get("history", history) == history:  # states saved before the fingerprint carry none
                return tensors, saved
            foreign = path
        where = " or ".join(str(f / STATE_FILE) for f in folders)
        if foreign is not None:
            raise ValueError(f"Resuming at step {state.global_step}, but {foreign} was saved by another run (its "
                             f"Trainer history differs from the checkpoint's being resumed). Resume from the "
                             f"checkpoint in output_dir, or pass its folder as TrainingArguments("
                             f"resume_from_checkpoint=...) too, so SQSDCallback finds its state.")
        latest, why = self._latest(state.global_step, history)
        if latest is not None:
            logger.warning(f"sqsd: {where} is {'unreadable' if torn else 'missing'} (the run was probably killed "
                           f"while saving it); the monitor's state is restored from {self.latest}, saved at the same "
                           f"step with the same Trainer history.")
            return latest
        note = "" if why is None else (f" The latest state {self.latest}, which stands in for a checkpoint's lost "
                                       f"state, {why}.")
        if torn is not None:
            raise ValueError(f"{torn}{note}") from torn
        raise FileNotFoundError(f"Resuming at step {state.global_step} but {where} is missing: the checkpoint was "
                                f"written by a run without SQSDCallback, the run was killed while saving it, or it "
                                f"lies outside output_dir (pass its folder as TrainingArguments("
                                f"resume_from_checkpoint=...) too). Resume from an earlier checkpoint, or start a "
                                f"new run (new output_dir).{note}")

    def _latest(self, step: int, history: str) -> tuple[tuple[dict[str, torch.Tensor], dict] | None, str | None]:
        """(the latest state if it was saved at ``step`` with ``history``, else None; why not, for the error)."""
        if self.latest is None:
            return None, None
        if not self.latest.is_file():
            return None, "is missing"
        try:
            tensors, saved = load_state(self.latest)
        except ValueError:
            return None, "is unreadable"
        if saved.get("step") != step:
            return None, f"was saved at step {saved.get('step')}, not {step}"
        if saved.get("history") != history:
            return None, "was saved by another run (its Trainer history differs from the checkpoint's)"
        return (tensors, saved), None
