"""Where results go: JSON-lines files appended and flushed as they are produced (they survive a killed run)."""

from __future__ import annotations

import io
import json
import math
import warnings
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
        self._f.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """All rows of a JSON-lines file (a torn last line from a killed run is skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


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
    """Create the run's folder; results of an earlier run in it are moved to ``previous-<k>/``, not overwritten."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    old = [p for p in path.iterdir() if p.is_file()]
    if any(p.name == "scores.jsonl" for p in old):
        k = 1 + sum(1 for p in path.iterdir() if p.is_dir() and p.name.startswith("previous-"))
        dest = path / f"previous-{k}"
        dest.mkdir()
        for p in old:
            p.rename(dest / p.name)


class WandbSink:
    """What scalars cannot show, to the wandb run the Trainer's WandbCallback opened: a histogram of the
    logging window's per-example SQSD, a table of the riskiest examples so far and the per-module drift
    heatmap (every ``every`` logging steps), and the monitor's configuration. Optional by design: without
    wandb, with no active run, or when a wandb call fails, it warns once and stops; training goes on."""

    COLUMNS = ["index", "sqsd", "danger", "safety", "step", "dropped", "text"]

    def __init__(self, every: int = 10) -> None:
        self.every, self.calls, self.configured, self.failed = every, 0, False, False
        try:
            import wandb
        except ImportError:
            wandb = None
        self.wandb = wandb

    def _run(self):
        return None if self.wandb is None or self.failed else self.wandb.run

    def log(self, step: int, values: list[float], top: list[dict], texts: dict, config: dict,
            heatmap=None) -> None:
        """One logging step; ``heatmap`` is a zero-argument function returning a Figure (made only when due)."""
        run = self._run()
        if run is None:
            return
        try:
            if not self.configured:
                run.config.update({"sqsd": config}, allow_val_change=True)
                self.configured = True
            payload = {"train/global_step": step}
            if values:
                payload["sqsd/sqsd_hist"] = self.wandb.Histogram(values)
            if self.calls % self.every == 0:
                payload["sqsd/riskiest"] = self.wandb.Table(columns=self.COLUMNS, data=[
                    [r["index"], r["sqsd"], r["danger"], r["safety"], r["step"], bool(r.get("dropped")),
                     texts.get(r["index"], "")[:200]] for r in top])
                fig = heatmap() if heatmap is not None else None
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
