"""Where the monitor's results go, one small class per backend behind one protocol (``Sink``): the run's files
always, and a sink per ``report_to`` backend that has one (``SINKS``). Every other reporting backend the Trainer
knows sees the ``sqsd/*`` scalars through the Trainer's own logs."""

from __future__ import annotations

from .base import Sink, SinkContext
from .files import RunFiles, iter_jsonl, read_jsonl
from .tensorboard import TensorBoardSink
from .wandb import WandbSink

SINKS: dict[str, type[Sink]] = {"tensorboard": TensorBoardSink, "wandb": WandbSink}
"""Sinks by ``TrainingArguments.report_to`` name."""


def check_report_to(report_to) -> list[str]:
    """The ``report_to`` names, each once; a name neither in ``SINKS`` nor among the Trainer's reporting
    integrations is an error listing the known ones."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    names = list(dict.fromkeys([report_to] if isinstance(report_to, str) else list(report_to or [])))
    unknown = [n for n in names if n not in SINKS and n not in INTEGRATION_TO_CALLBACK and n not in ("all", "none")]
    if unknown:
        known = sorted({*SINKS, *INTEGRATION_TO_CALLBACK})
        raise ValueError(f"report_to names {unknown} that SQSDCallback does not know; the known ones are {known}.")
    return names


def make_sinks(report_to, run: SinkContext) -> list[Sink]:
    """The run's files, then a sink for each ``report_to`` name that has one (``check_report_to``)."""
    return [RunFiles.for_run(run), *(SINKS[n].for_run(run) for n in check_report_to(report_to) if n in SINKS)]


__all__ = ["SINKS", "RunFiles", "Sink", "SinkContext", "TensorBoardSink", "WandbSink", "check_report_to", "iter_jsonl",
           "make_sinks", "read_jsonl"]
