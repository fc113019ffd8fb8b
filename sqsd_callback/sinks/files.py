"""The run's JSON-lines files: appended and flushed as rows are produced (they survive a killed run), read back one
row at a time, and cut back to a checkpoint when a run resumes."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..once import WarnOnce
from .base import Sink, SinkContext


def _clean(value):
    """JSON-safe: NaN/Inf become null, tensors and numpy scalars become Python numbers."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlWriter:
    """Appends one JSON object per line and flushes after every ``write``. A failed write (a full disk, a lost
    mount) warns once, naming the file, and does not stop training: later writes try again."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self.failures = 0
        self.warn = WarnOnce()

    def write(self, rows: list[dict]) -> None:
        text = "".join(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n" for row in rows)
        try:
            self._f.write(text)
            self._f.flush()
        except OSError as err:
            self.failures += 1
            self.warn("write", f"SQSDCallback could not write to {self.path} ({err}); training goes on, and the "
                      f"rows of this step are missing from the file.")

    def close(self) -> None:
        try:  # rows still buffered after a failed write are flushed here; a disk still full must not end the run
            self._f.close()
        except OSError as err:
            warnings.warn(f"SQSDCallback could not finish {self.path} ({err}); its last rows are missing.",
                          stacklevel=2)


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """The rows of a JSON-lines file one at a time (a torn last line from a killed run is skipped)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def read_jsonl(path: str | Path) -> list[dict]:
    """All rows of a JSON-lines file (a torn last line from a killed run is skipped)."""
    return list(iter_jsonl(path))


def truncate_jsonl(path: str | Path, keep) -> None:
    """Rewrite a JSON-lines file with only the rows ``keep(row)`` accepts (a resumed run cuts back to its
    checkpoint, so rows are neither duplicated nor missing)."""
    path = Path(path)
    if path.is_file():
        kept = [r for r in read_jsonl(path) if keep(r)]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(path)


class RunFiles(Sink):
    """``scores.jsonl``, ``drift.jsonl`` and ``examples.jsonl`` in the run's folder: appended and flushed every
    step (they survive a killed run); a failed write warns once per file and training goes on."""

    NAMES = ("scores", "drift", "examples")

    def __init__(self, out: Path) -> None:
        self.files = {name: JsonlWriter(Path(out) / f"{name}.jsonl") for name in self.NAMES}

    @classmethod
    def for_run(cls, run: SinkContext) -> RunFiles:
        return cls(run.folder)

    def step(self, step, rows, drift, texts) -> None:
        self.files["examples"].write(texts)
        self.files["scores"].write(rows)
        if drift is not None:
            self.files["drift"].write([drift])

    def close(self) -> None:
        for f in self.files.values():
            f.close()


