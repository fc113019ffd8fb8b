"""The run's folder (``<output_dir>/sqsd``): started afresh or cut back to the checkpoint a run resumes from, an
earlier run's results moved aside rather than mixed in, and the small JSON files that describe the run and its
stop. Only the main process writes; every process knows where it is."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from transformers.utils import logging

from ..sinks.files import truncate_jsonl

logger = logging.get_logger(__name__)


class RunFolder:
    """The folder ``path`` of one run; ``main``: this process writes it."""

    def __init__(self, path: str | Path, main: bool) -> None:
        self.path, self.main = Path(path), main

    def open(self, resume_step: int, seen: set[int]) -> None:
        """Ready the folder before any step: a new run (``resume_step`` 0) moves an earlier run's results aside; a
        resumed one cuts the files back to its checkpoint (``seen``: the examples it had seen by then). A folder
        that cannot be written is refused here, with what to do."""
        if not self.main:
            return
        with self.writing():
            if resume_step > 0:
                self._cut_back(resume_step, seen)
            else:
                start_run_dir(self.path)

    @contextlib.contextmanager
    def writing(self):
        """Within: an OSError (a full disk, a read-only folder) is raised again naming the folder and the fix. For
        the writes made before the first step; later ones warn and training goes on."""
        try:
            yield
        except OSError as err:
            raise OSError(err.errno, f"SQSDCallback cannot write its files in {self.path} "
                                     f"({err.strerror or err}): free space there, or point "
                                     f"SQSDConfig(output_dir=...) at a writable folder with room.") from err

    def write_run(self, described: dict) -> None:
        """``run.json``: the monitor's settings, sets and policies."""
        if self.main:
            with self.writing():
                (self.path / "run.json").write_text(json.dumps(described, indent=2))

    def write_stop(self, record: dict) -> None:
        """``stop.json``: why and where the drift stop ended the run."""
        if self.main:
            (self.path / "stop.json").write_text(json.dumps(record))

    def _cut_back(self, step: int, seen: set[int]) -> None:
        """Cut the run's files back to the checkpoint at optimizer step ``step`` that training resumes from."""
        self.path.mkdir(parents=True, exist_ok=True)  # a resume into a new output_dir
        truncate_jsonl(self.path / "scores.jsonl", lambda r: r["step"] < step)
        truncate_jsonl(self.path / "drift.jsonl", lambda r: r["step"] <= step)
        truncate_jsonl(self.path / "examples.jsonl", lambda r: r["index"] in seen)
        self._set_aside_later_stop(step)

    def _set_aside_later_stop(self, step: int) -> None:
        """A drift stop recorded after the resumed checkpoint (stop.json and its last_safe/) belongs to the run
        this one replaces: moved to previous-<k>/, not left beside this run's files as if it were its own."""
        stop = self.path / "stop.json"
        if not stop.is_file():
            return
        try:
            recorded = json.loads(stop.read_text())
        except ValueError:  # torn
            recorded = None
        stopped_at = recorded.get("step") if isinstance(recorded, dict) else None
        if isinstance(stopped_at, int) and stopped_at <= step:
            return  # a stop in the history this run resumes: still its own
        dest = set_aside([p for p in (stop, self.path / "last_safe") if p.exists()])
        which = f"the drift stop recorded at step {stopped_at}" if isinstance(stopped_at, int) else \
            "an unreadable stop.json"
        logger.warning(f"sqsd: resuming at step {step}, before {which}: its stop.json and last-safe adapter were "
                       f"moved to {dest}.")


def start_run_dir(path: str | Path) -> None:
    """Create the run's folder; results of an earlier run in it (its files, last-safe adapter and report) are moved
    to ``previous-<k>/`` (k past every earlier one), not overwritten or mixed with the new run's."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    old = [p for p in path.iterdir() if p.is_file() or p.name in ("last_safe", "report")]
    if any(p.name == "scores.jsonl" for p in old):
        set_aside(old)


def set_aside(items: list[Path]) -> Path:
    """Move ``items`` (files or folders of one run folder) into its next ``previous-<k>/`` (k past every earlier
    one); return that folder."""
    path = items[0].parent
    ks = [int(p.name[9:]) for p in path.iterdir() if p.is_dir() and re.fullmatch(r"previous-\d+", p.name)]
    dest = path / f"previous-{max(ks, default=0) + 1}"
    dest.mkdir()
    for p in items:
        p.rename(dest / p.name)
    return dest
