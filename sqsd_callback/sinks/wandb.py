"""wandb: scalars, a histogram of the window's scores, the riskiest examples and the per-module drift heatmap, in
the run the Trainer's WandbCallback opened."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable

from .base import Sink, SinkContext, trainer_keys
from .files import iter_jsonl


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

    @classmethod
    def for_run(cls, run: SinkContext) -> WandbSink:
        def heatmap():
            from .heatmap import layer_heatmap  # matplotlib, only when a heatmap is due
            return layer_heatmap(iter_jsonl(run.folder / "drift.jsonl"), run.set_kinds) if run.set_kinds else None
        seen = run.folder / "examples.jsonl"  # a resumed run's texts so far (a new run's were moved aside)
        return cls(run.described, run.wandb_every, heatmap, iter_jsonl(seen) if seen.is_file() else ())

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
            payload = {"train/global_step": step, **trainer_keys(scalars)}
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
