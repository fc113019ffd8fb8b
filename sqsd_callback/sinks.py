"""Where results go, one small class per backend behind one interface (``Sink``): the run's JSON-lines files (appended
and flushed as they are produced: they survive a killed run), TensorBoard and wandb."""

from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path


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

    def write(self, rows: list[dict]) -> None:
        text = "".join(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n" for row in rows)
        try:
            self._f.write(text)
            self._f.flush()
        except OSError as err:
            self.failures += 1
            if self.failures == 1:
                warnings.warn(f"SQSDCallback could not write to {self.path} ({err}); training goes on, and the rows "
                              f"of this step are missing from the file.", stacklevel=2)

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


class Sink:
    """One place the monitor's results go, driven by the callback's events (one small class per backend, as
    transformers' reporting integrations are). Only the main process has sinks."""

    def step(self, step: int, rows: list[dict], drift: dict | None, texts: list[dict]) -> None:
        """After optimizer step ``step``: the step's score rows (every process's), the drift row (None without
        direction sets) and the texts of examples seen for the first time."""

    def log(self, step: int, scalars: dict[str, float], values: list[float], top: list[dict]) -> None:
        """At a Trainer logging step: the ``sqsd/*`` scalars, the logging window's SQSD values and the riskiest
        examples so far."""

    def close(self) -> None:
        """The run has ended."""


class RunFiles(Sink):
    """``scores.jsonl``, ``drift.jsonl`` and ``examples.jsonl`` in the run's folder: appended and flushed every
    step (they survive a killed run); a failed write warns once per file and training goes on."""

    NAMES = ("scores", "drift", "examples")

    def __init__(self, out: Path) -> None:
        self.files = {name: JsonlWriter(Path(out) / f"{name}.jsonl") for name in self.NAMES}

    def step(self, step, rows, drift, texts) -> None:
        self.files["examples"].write(texts)
        self.files["scores"].write(rows)
        if drift is not None:
            self.files["drift"].write([drift])

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _trainer_keys(scalars: dict[str, float]) -> dict[str, float]:
    """The names the Trainer's own reporters give training scalars (``train/sqsd/drift``)."""
    return {f"train/{k}": v for k, v in scalars.items()}


class TensorBoardSink(Sink):
    """The ``sqsd/*`` scalars as ``train/sqsd/*`` at each logging step, in their own event file beside the
    Trainer's: in ``TENSORBOARD_LOGGING_DIR`` where set (transformers 5), else in ``logging_dir`` (the
    TrainingArguments field of transformers < 5), else in ``<run folder>/tensorboard``. Without tensorboard, or
    when a write fails, it warns once and stops; training goes on."""

    def __init__(self, out: Path, logging_dir: str | None = None) -> None:
        self.dir = os.path.expanduser(os.getenv("TENSORBOARD_LOGGING_DIR") or logging_dir
                                      or str(Path(out) / "tensorboard"))
        self.writer, self.failed = None, False

    def log(self, step, scalars, values, top) -> None:
        if self.failed:
            return
        try:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(log_dir=self.dir, filename_suffix=".sqsd")
            for k, v in _trainer_keys(scalars).items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        except Exception as e:  # a dashboard must never stop training
            self.failed = True
            warnings.warn(f"TensorBoard logging failed ({type(e).__name__}: {e}); sqsd keeps writing its files "
                          f"and the Trainer's logs.", stacklevel=2)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbSink(Sink):
    """To the wandb run the Trainer's WandbCallback opened: the ``sqsd/*`` scalars (as ``train/sqsd/*`` against
    ``train/global_step``, the Trainer's names), a histogram of the logging window's per-example SQSD, a table of
    the riskiest examples so far and the per-module drift heatmap (every ``every`` logging steps), and the
    monitor's configuration. Optional by design: without wandb, with no active run, or when a wandb call fails,
    it warns once and stops; training goes on."""

    COLUMNS = ["index", "sqsd", "danger", "safety", "step", "dropped", "text"]

    def __init__(self, config: dict, every: int = 10, heatmap=None, texts: Iterable[dict] = ()) -> None:
        """``heatmap``: a zero-argument function returning a Figure (made only when due); ``texts``: the examples'
        texts a resumed run saw before its checkpoint (rows of examples.jsonl)."""
        self.config, self.every, self.heatmap = config, every, heatmap
        self.calls, self.configured, self.failed, self.texts = 0, False, False, {}
        self.step(0, [], None, texts)
        try:
            import wandb
        except ImportError:
            wandb = None
        self.wandb = wandb

    def _run(self):
        return None if self.wandb is None or self.failed else self.wandb.run

    def step(self, step, rows, drift, texts) -> None:
        self.texts.update({t["index"]: t["text"][:200] for t in texts})

    def log(self, step, scalars, values, top) -> None:
        run = self._run()
        if run is None:
            return
        try:
            if not self.configured:
                run.config.update({"sqsd": self.config}, allow_val_change=True)
                self.configured = True
            payload = {"train/global_step": step, **_trainer_keys(scalars)}
            if values:
                payload["sqsd/sqsd_hist"] = self.wandb.Histogram(values)
            if self.calls % self.every == 0:
                payload["sqsd/riskiest"] = self.wandb.Table(columns=self.COLUMNS, data=[
                    [r["index"], r["sqsd"], r["danger"], r["safety"], r["step"], bool(r.get("dropped")),
                     self.texts.get(r["index"], "")] for r in top])
                fig = self.heatmap() if self.heatmap is not None else None
                if fig is not None:
                    payload["sqsd/layer_drift"] = self.wandb.Image(_png(fig))
            self.calls += 1
            run.log(payload)
        except Exception as e:  # a dashboard must never stop training
            self.failed = True
            warnings.warn(f"wandb logging failed ({type(e).__name__}: {e}); sqsd keeps writing its files and the "
                          f"Trainer's logs, and stops sending wandb views for this run.", stacklevel=2)


def _png(fig):
    """A Figure rendered to a PIL image (wandb's own matplotlib path expects pyplot, which this package never uses)."""
    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    buf.seek(0)
    return Image.open(buf)
