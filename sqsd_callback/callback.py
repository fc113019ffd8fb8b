"""SQSDCallback: per-example SQSD from the training step's own backward pass, and the run's drift.

Thin glue over Trainer events: a forward pre-hook on the model notes each micro-batch (which dataset rows, how
many scored tokens), the engine scores it, and at each optimizer step the rows go to
``<output_dir>/scores.jsonl`` and the drift to ``drift.jsonl``; ``sqsd/*`` scalars join the Trainer's logs.
"""

from __future__ import annotations

import inspect
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from .directions import DirectionBank, DirectionSet
from .drift import Drift, summarize
from .engines import make_engine
from .engines.base import Batch, Stats, scored_tokens
from .identity import ExampleIndex
from .modules import lora_targets
from .scoring import check_metric, project, rows
from .sinks import JsonlWriter

_TEXT_CHARS = 600


@dataclass
class _MicroBatch:
    """What the forward pass tells about one micro-batch; ``weight[b]`` is the loss weight each of row b's
    scored tokens got (read off the backward pass), which scales hook gradients to batch-size-1 size."""

    batch: Batch
    weight: torch.Tensor | None = None
    stats: Stats | None = None


@dataclass
class _LogWindow:
    """Scores since the last logging step."""

    values: list[float] = field(default_factory=list)

    def pop(self) -> dict[str, float]:
        vals, self.values = self.values, []
        if not vals:
            return {}
        return {"sqsd/batch_sqsd_mean": sum(vals) / len(vals), "sqsd/batch_sqsd_max": max(vals)}


class SQSDCallback(TrainerCallback):
    """Scores every training example for safety degradation and tracks the run's drift.

    Args:
        danger: danger direction sets (``DirectionSet(kind="danger")``).
        safety: safety direction sets.
        metric: ``"cosine"`` (the paper's), ``"projection"`` or ``"global_cosine"``.
        engine: ``"hooks"`` (scores the step's own backward pass, what training used: dropout masks included),
            ``"vmap"`` or ``"loop"`` (extra passes at the step's parameters without dropout; oracles).
        output_dir: where ``scores.jsonl`` and ``drift.jsonl`` go; None means ``<args.output_dir>/sqsd``.
    """

    def __init__(self, danger=(), safety=(), metric: str = "cosine", engine: str = "hooks",
                 output_dir: str | None = None) -> None:
        sets = [*danger, *safety]
        for s in sets:
            if not isinstance(s, DirectionSet):
                raise TypeError(f"danger/safety must be lists of DirectionSet, got {type(s).__name__}.")
        for s, kind in [*((s, "danger") for s in danger), *((s, "safety") for s in safety)]:
            if s.kind != kind:
                raise ValueError(f"Direction set {s.name!r} is a {s.kind} set but was passed as {kind}.")
        if not sets:
            raise ValueError("SQSDCallback needs at least one direction set: danger=[...] and/or safety=[...].")
        for s in sets:
            s.check_values()
        self.sets, self.metric, self.engine_name = sets, check_metric(metric), engine
        self.output_dir = output_dir
        self._handles: list = []
        self._pending: list[_MicroBatch] = []
        self._step_rows: list[dict] = []
        self._window = _LogWindow()
        self._last_drift: dict[str, float] = {}
        self._weight_warned = False

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, processing_class=None,
                       **kwargs):
        self._run_before_reporters()
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.targets = lora_targets(model)
        device = next(iter(self.targets.values())).A.device
        self.bank = DirectionBank(self.sets, {m: t.shape for m, t in self.targets.items()}).to(device)
        self.engine = make_engine(self.engine_name, self.targets, self.bank)
        self.model = model
        self.index = ExampleIndex(getattr(train_dataloader, "dataset", None))
        self.drift = Drift(self.targets, self.bank)
        out = Path(self.output_dir or Path(args.output_dir) / "sqsd")
        self.scores_file, self.drift_file = JsonlWriter(out / "scores.jsonl"), JsonlWriter(out / "drift.jsonl")
        self.texts_file, self._seen = JsonlWriter(out / "examples.jsonl"), set()
        if state.is_world_process_zero:
            (out / "run.json").write_text(json.dumps(self._describe(), indent=2))
        if self.engine_name == "hooks":
            self.engine.attach()
        self._handles = [
            model.register_forward_pre_hook(self._on_forward, with_kwargs=True),
            model.register_forward_hook(self._on_outputs, with_kwargs=True),
        ]

    def on_substep_end(self, args, state, control, **kwargs):
        self._close_micro_batch()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._close_micro_batch()
        for mb in self._pending:
            if mb.stats is None:  # vmap / loop: an extra pass at the step's parameters
                mb.stats = self.engine.compute(self.model, mb.batch)
                mb.weight = None
            self._note_texts(mb.batch)
            scale = self._scale(mb)
            self._step_rows += rows(project(mb.stats, self.bank, self.metric, scale), self.bank,
                                    mb.batch.n_scored, mb.batch.index)
        self._pending = []

    def on_step_end(self, args, state, control, **kwargs):
        step, epoch = state.global_step - 1, state.epoch
        for r in self._step_rows:
            r.update(step=step, epoch=epoch, dropped=False)
            if r["sqsd"] is not None:
                self._window.values.append(r["sqsd"])
        self.scores_file.write(self._step_rows)
        self._step_rows = []
        measured = self.drift.measure()
        self._last_drift = summarize(measured, self.bank)
        self.drift_file.write([{"step": state.global_step, "epoch": epoch, **self._last_drift,
                                **{f"cosine/{k}": v for k, v in zip(self.bank.keys, measured["cosine"])},
                                **{f"projection/{k}": v for k, v in zip(self.bank.keys, measured["projection"])},
                                "norm": measured["norm"], "layers": measured["layers"]}])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self._last_drift:
            return
        scalars = {f"sqsd/{k}": v for k, v in self._last_drift.items()}
        scalars.update(self._window.pop())
        logs.update(scalars)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.engine_name == "hooks":
            self.engine.detach()
        for f in (self.scores_file, self.drift_file, self.texts_file):
            f.close()

    # ------------------------------------------------------------ model hooks
    def _on_forward(self, module, args, kwargs):
        """Start of a training micro-batch: note its rows (taking out an ``index`` input the model must not see)
        and open the engine's record."""
        if not module.training or not torch.is_grad_enabled():
            return
        self._close_micro_batch()
        ids = kwargs.get("input_ids", args[0] if args else None)
        labels = kwargs.get("labels")
        if ids is None or labels is None:
            raise ValueError("SQSDCallback needs input_ids and labels in each training batch (the examples' "
                             "scored tokens are the labels that are not -100).")
        mask = kwargs.get("attention_mask")
        own_index = kwargs.pop("index", None)  # the dataset's own index column, where it reaches the batch
        index = own_index.tolist() if own_index is not None else self.index.lookup(ids, mask)
        batch = Batch(ids.detach(), labels.detach(), torch.ones_like(ids) if mask is None else mask.detach(), index)
        self._pending.append(_MicroBatch(batch))
        self._num_items = kwargs.get("num_items_in_batch")
        if self.engine_name == "hooks":
            self.engine.start(ids.shape[0], ids.device)
        return args, kwargs

    def _on_outputs(self, module, args, kwargs, outputs):
        """Read each row's per-token loss weight off the backward pass: through the model's own loss
        (``sum / num_items_in_batch`` or a mean) or TRL's per-token ``log_probs``."""
        if not self._pending or not module.training or not torch.is_grad_enabled():
            return
        mb = self._pending[-1]
        log_probs, loss = getattr(outputs, "log_probs", None), getattr(outputs, "loss", None)
        if (isinstance(log_probs, torch.Tensor) and log_probs.requires_grad
                and log_probs.shape[0] == mb.batch.labels.shape[0]):
            labels = mb.batch.labels
            scored = (labels[:, 1:] if log_probs.shape[1] == labels.shape[1] - 1 else labels) != -100

            def from_log_probs(g):  # the loss sums −log_probs over every position: read only scored ones
                n = mb.batch.n_scored.to(g.device).clamp(min=1)
                mb.weight = -(g.detach().float() * scored.to(g.device)).sum(-1) / n
            log_probs.register_hook(from_log_probs)
        elif isinstance(loss, torch.Tensor) and loss.requires_grad:
            denom = self._num_items if self._num_items is not None else scored_tokens(mb.batch.labels).sum()

            def from_loss(g):
                w = g.detach().float() / torch.as_tensor(denom, device=g.device).float()
                mb.weight = w.expand(mb.batch.labels.shape[0])
            loss.register_hook(from_loss)

    # --------------------------------------------------------------- helpers
    def _close_micro_batch(self) -> None:
        if self.engine_name == "hooks" and self.engine.record is not None and self._pending:
            self._pending[-1].stats = self.engine.finish()

    def _note_texts(self, batch: Batch) -> None:
        """Write each example's decoded text once (``examples.jsonl``) for reports and tables."""
        if self.tokenizer is None:
            return
        new = []
        for b, i in enumerate(batch.index):
            if i is not None and i not in self._seen:
                self._seen.add(i)
                ids = batch.input_ids[b][batch.attention_mask[b].bool()].tolist()
                new.append({"index": i, "text": self.tokenizer.decode(ids, skip_special_tokens=True)[:_TEXT_CHARS]})
        self.texts_file.write(new)

    def _scale(self, mb: _MicroBatch) -> torch.Tensor | None:
        """Per-row factor turning the hook gradient (loss weight w per token) into the example's mean-loss
        gradient: 1 / (w · n_scored). Only the ``projection`` metric depends on it."""
        if self.engine_name != "hooks":
            return None
        if mb.weight is None:
            if self.metric == "projection" and not self._weight_warned:
                self._weight_warned = True
                warnings.warn("SQSDCallback could not read the loss weights (no `loss` or `log_probs` in the "
                              "model outputs): projection scores are in the units of the Trainer's loss "
                              "normalisation, not per example.", stacklevel=2)
            return None
        n = mb.batch.n_scored.to(mb.weight.device).float()
        w = mb.weight * n
        return torch.where(w != 0, 1.0 / torch.where(w != 0, w, torch.ones_like(w)), torch.zeros_like(w))

    def _run_before_reporters(self) -> None:
        """Move this callback to the front of the Trainer's callback list, so the ``sqsd/*`` scalars it adds in
        ``on_log`` reach every reporting backend (wandb, TensorBoard, ...) that runs after it."""
        frame = inspect.currentframe()
        handler = None
        while frame is not None and handler is None:
            candidate = frame.f_locals.get("self")
            if type(candidate).__name__ == "CallbackHandler" and self in getattr(candidate, "callbacks", []):
                handler = candidate
            frame = frame.f_back
        if handler is None:
            warnings.warn("SQSDCallback could not find the Trainer's callback list; sqsd/* scalars reach "
                          "the log history and the callbacks that run after it.", stacklevel=2)
            return
        handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)

    def _describe(self) -> dict:
        return {
            "metric": self.metric,
            "engine": self.engine_name,
            "sets": [{"key": k, "kind": s.kind, "name": s.name, "source": s.source,
                      "modules": int(self.bank.present[:, i].sum())}
                     for i, (k, s) in enumerate(zip(self.bank.keys, self.sets))],
            "modules": self.bank.modules,
            "duplicate_examples": self.index.duplicates,
        }
