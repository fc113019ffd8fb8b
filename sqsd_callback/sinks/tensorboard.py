"""TensorBoard: the monitor's scalars beside the Trainer's own."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from .base import Sink, SinkContext, trainer_keys


class TensorBoardSink(Sink):
    """The ``sqsd/*`` scalars as ``train/sqsd/*`` at each logging step, in their own event file beside the
    Trainer's: in ``TENSORBOARD_LOGGING_DIR`` where set (transformers 5), else in ``logging_dir`` (the
    TrainingArguments field of transformers < 5), else in ``<run folder>/tensorboard``. Without tensorboard, or
    when a write fails, it warns once and stops; training goes on."""

    def __init__(self, out: Path, logging_dir: str | None = None) -> None:
        self.dir = os.path.expanduser(os.getenv("TENSORBOARD_LOGGING_DIR") or logging_dir
                                      or str(Path(out) / "tensorboard"))
        self.writer, self.failed = None, False

    @classmethod
    def for_run(cls, run: SinkContext) -> TensorBoardSink:
        return cls(run.folder, getattr(run.args, "logging_dir", None))

    def log(self, step, scalars, values, top) -> None:
        if self.failed:
            return
        try:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(log_dir=self.dir, filename_suffix=".sqsd")
            for k, v in trainer_keys(scalars).items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        except Exception as e:  # a dashboard must never stop training
            self.failed = True
            warnings.warn(f"TensorBoard logging failed ({type(e).__name__}: {e}); sqsd keeps writing its files "
                          f"and the Trainer's logs.", stacklevel=2)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
