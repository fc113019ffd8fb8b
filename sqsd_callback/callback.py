"""SQSDCallback: per-example SQSD from the training step's own backward pass, the run's drift, and actions.

Thin glue over Trainer events and three model hooks: a forward pre-hook notes each micro-batch (which dataset
rows, how many scored tokens) and opens the engine's record; a forward hook reads the loss weights off the
outputs and queues ``_after_backward`` to run when that micro-batch's backward has finished (before the
Trainer clips gradients), where scores are made, dropped examples are removed from the gradients and the
anchor's gradient is added. At each optimizer step rows go to ``scores.jsonl`` and the drift to
``drift.jsonl``; ``sqsd/*`` scalars join the Trainer's logs; ``sqsd_state.safetensors`` rides in every checkpoint.
"""

from __future__ import annotations

import inspect
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.utils import logging

from .config import SQSDConfig
from .directions import DirectionBank, DirectionSet
from .distributed import Processes, after_queued_callbacks, full_parameters, grads_reduced_now
from .drift import Drift, summarize
from .engines import ENGINES, make_engine
from .engines.base import IGNORE_INDEX, Batch, Segments, Stats, scored_tokens, targets_scored
from .identity import ExampleIndex
from .layers import find_targets
from .policies import Anchor, DriftStop, DropPolicy
from .scoring import project, riskiest, rows
from .sinks import JsonlWriter, WandbSink, read_jsonl, start_run_dir, truncate_jsonl
from .state import STATE_FILE, load_state, save_state, split

_TEXT_CHARS = 600
logger = logging.get_logger(__name__)


@dataclass
class _MicroBatch:
    """One micro-batch: its rows, ``weight[b]`` (the loss weight each scored token of row b got, read off the
    backward pass; it scales hook gradients to batch-size-1 size), its stats and scored rows once known. Rows are
    made at the step's end (one wait for the device per step), at once where a drop policy needs them."""

    batch: Batch
    own_index: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    stats: Stats | None = None
    rows: list[dict] | None = None
    kept_tokens: int = 0


@dataclass
class _LogWindow:
    """Scores and drops since the last logging step."""

    values: list[float] = field(default_factory=list)
    dropped: int = 0

    def pop(self) -> dict[str, float]:
        vals, dropped, self.values, self.dropped = self.values, self.dropped, [], 0
        out = {"sqsd/dropped": dropped}
        if vals:
            out.update({"sqsd/batch_sqsd_mean": sum(vals) / len(vals), "sqsd/batch_sqsd_max": max(vals)})
        return out


class SQSDCallback(TrainerCallback):
    """Scores every training example for safety degradation, tracks the run's drift, and can act on both.

    Args:
        danger: danger direction sets (``DirectionSet(kind="danger")``).
        safety: safety direction sets.
        config: an :class:`SQSDConfig`; or pass its options as keywords (``metric="cosine"``, ``drop_above=0.5``,
            ``stop_drift_above=0.2`` ...), not both. Every option is documented on SQSDConfig.
        anchor: a direction set (e.g. ``DirectionSet.from_weight_diff(aligned, base, kind="safety")``) that AsFT
            anchors the LoRA update to: adds λ‖(I − Ĉ)ΔW‖² to every step's loss (λ: ``anchor_lambda``; logged as
            sqsd/anchor_penalty).
    """

    def __init__(self, danger=(), safety=(), config: SQSDConfig | None = None, *, anchor: DirectionSet | None = None,
                 **options) -> None:
        if config is not None and options:
            raise ValueError(f"Pass the options either as config=SQSDConfig(...) or as keywords, not both (got "
                             f"config and {sorted(options)}).")
        if config is not None and not isinstance(config, SQSDConfig):
            raise TypeError(f"config must be an SQSDConfig, got {type(config).__name__}.")
        cfg = self.config = config if config is not None else SQSDConfig.from_dict(options)
        danger, safety = list(danger), list(safety)
        sets = [*danger, *safety]
        for s in [*sets, *([anchor] if anchor is not None else [])]:
            if not isinstance(s, DirectionSet):
                raise TypeError(f"danger/safety/anchor must be DirectionSet objects, got {type(s).__name__}.")
        for s, kind in [*((s, "danger") for s in danger), *((s, "safety") for s in safety)]:
            if s.kind != kind:
                raise ValueError(f"Direction set {s.name!r} is a {s.kind} set but was passed as {kind}.")
        self.drop = DropPolicy(cfg.drop_above, cfg.drop_top_fraction, cfg.drop_zscore_above, cfg.drop_min_history,
                               cfg.exclude_dropped)
        self.stop = DriftStop(cfg.stop_drift_above, cfg.stop_patience) if cfg.stop_drift_above is not None else None
        if not sets and (self.drop.active or self.stop is not None):
            raise ValueError("Drop and stop thresholds act on SQSD scores and drift: pass danger=[...] and/or "
                             "safety=[...] direction sets.")
        if not sets and anchor is None:
            raise ValueError("SQSDCallback needs at least one direction set: danger=[...] and/or safety=[...].")
        _refuse_same_directions(danger, safety)
        for s in sets:
            s.check_values()
        self.sets, self.metric, self.engine_name = sets, cfg.metric, cfg.engine
        self.output_dir, self.save_last_safe = cfg.output_dir, cfg.save_last_safe
        self.top_k, self.wandb_every = cfg.top_k, cfg.wandb_every
        self.anchor = Anchor(anchor, cfg.anchor_lambda) if anchor is not None else None
        self._handles: list = []
        self._pending: list[_MicroBatch] = []
        self._removal: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(p) -> (p, removal after DDP)
        self._window = _LogWindow()
        self._last_drift: dict[str, float] = {}
        self._anchor_value: float | None = None
        self._safe_params: dict | None = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, processing_class=None,
                       **kwargs):
        self._run_before_reporters()
        self.model = model
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.targets = find_targets(model)
        if self.anchor is not None:
            self.anchor.bind(self.targets)
        self.params = [p for t in self.targets.values() for p in t.params if p.requires_grad]
        names = {id(p): n for n, p in model.named_parameters()}
        self._param_names = {names[id(p)] for p in self.params}
        if self.drop.active:
            others = [n for n, p in model.named_parameters()
                      if p.requires_grad and not any(p is q for q in self.params)]
            if others:
                raise ValueError(f"Exact drops remove examples through the gradients of the scored weight matrices, "
                                 f"but the model also trains {len(others)} other parameter(s), e.g. {others[:2]} "
                                 f"(modules_to_save, embeddings, norms?). Freeze them or train without drops.")
        if self.sets:
            device = self.params[0].device
            self.bank = DirectionBank(self.sets, {m: t.shape for m, t in self.targets.items()}).to(device)
            self.engine = make_engine(self.engine_name, self.targets, self.bank, keep_grads=self.drop.active,
                                      model=model)
            self.drift = Drift(self.targets, self.bank, gather=self._full_parameters)
        self.procs = Processes.current()
        self._check_processes(model)
        self.main = state.is_world_process_zero
        self.index = ExampleIndex(getattr(train_dataloader, "dataset", None))
        self.out = Path(self.output_dir or Path(args.output_dir) / "sqsd")
        self._seen, self._new_texts = set(), []
        if state.global_step > 0:
            self._resume(args, state)
        elif self.main:
            start_run_dir(self.out)
        if state.global_step == 0 and self.save_last_safe:  # θ_0 is where the run starts: the first safe state
            self._keep_safe_params()
        names = ("scores", "drift", "examples")
        self.files = {name: JsonlWriter(self.out / f"{name}.jsonl") for name in names} if self.main else {}
        report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
        self.dashboard = WandbSink(self.wandb_every) if "wandb" in report_to else None
        self._top, self._texts = [], {}
        if self.main:
            (self.out / "run.json").write_text(json.dumps(self._describe(args), indent=2))
        if self.sets:
            self.engine.attach()
        self._handles = [model.register_forward_pre_hook(self._on_forward, with_kwargs=True),
                         model.register_forward_hook(self._on_outputs, with_kwargs=True)]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for mb in self._pending:
            if mb.stats is None and self.sets:  # oracle engines: extra passes at the step's parameters
                mb.stats = self.engine.compute(self.model, mb.batch)

    def on_step_end(self, args, state, control, **kwargs):
        for mb in self._pending:
            if mb.rows is None and mb.stats is not None:
                mb.rows = self._rows(mb)
        step_rows = self.procs.gather([r for mb in self._pending if mb.rows for r in mb.rows])
        self._write("examples", self.procs.gather(self._new_texts))
        self._pending, self._new_texts = [], []
        for r in step_rows:
            r.update(step=state.global_step - 1, epoch=state.epoch)
            self._window.dropped += bool(r["dropped"])
            if r["sqsd"] is not None:
                self._window.values.append(r["sqsd"])
        self._write("scores", step_rows)
        if step_rows and all(r["sqsd"] is None for r in step_rows):
            self._warn_once("unscored", f"No example of optimizer step {state.global_step - 1} has a scored token "
                            f"(every label is -100): nothing was trained or scored. Check the loss mask (e.g. "
                            f"completion_only_loss / assistant_only_loss and the chat template).")
        if not self.sets:
            return
        self._top = riskiest(self._top + step_rows, self.top_k)
        measured = self.drift.measure()
        self._last_drift = summarize(measured, self.bank)
        self._write("drift", [{"step": state.global_step, "epoch": state.epoch, **self._last_drift,
                               **{f"cosine/{k}": v for k, v in zip(self.bank.keys, measured["cosine"])},
                               **{f"projection/{k}": v for k, v in zip(self.bank.keys, measured["projection"])},
                               "norm": measured["norm"], "layers": measured["layers"]}])
        if self.stop is not None:
            self._check_stop(state, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        scalars = {f"sqsd/{k}": v for k, v in self._last_drift.items()}
        values = list(self._window.values)
        if self.sets:
            scalars.update(self._window.pop())
        if self._anchor_value is not None:
            scalars["sqsd/anchor_penalty"] = self._anchor_value
        logs.update(scalars)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)
        if self.dashboard is not None and self.sets:
            from . import plots  # matplotlib, only for the wandb heatmap
            kinds = dict(zip(self.bank.keys, (s.kind for s in self.sets)))
            self.dashboard.log(state.global_step, values, self._top, self._texts, self._describe(args),
                               heatmap=lambda: plots.layer_heatmap(read_jsonl(self.out / "drift.jsonl"), kinds))

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir() and state.is_world_process_zero:
            try:
                save_state(ckpt / STATE_FILE, *self._state())
            except OSError as err:  # a full disk must not end the run; resuming from this checkpoint will say so
                self._warn_once(f"state:{err.errno}", f"SQSDCallback could not write {ckpt / STATE_FILE} ({err}); "
                                "training goes on, but this checkpoint cannot resume the monitor's state.")

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.sets:
            self.engine.detach()
        for f in self.files.values():
            f.close()

    # ------------------------------------------------------------ model hooks
    def _on_forward(self, module, args, kwargs):
        """Start of a training micro-batch: note its rows (taking out an ``index`` input the model must not see)
        and open the engine's record."""
        if not module.training or not torch.is_grad_enabled():
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        labels = kwargs.get("labels")
        if ids is None or labels is None:
            raise ValueError("SQSDCallback needs input_ids and labels in each training batch (the examples' "
                             "scored tokens are the labels that are not -100).")
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.detach()
        position_ids = kwargs.get("position_ids")
        segments = None if position_ids is None else Segments.from_position_ids(position_ids, mask)
        batch = Batch(ids.detach(), labels.detach(), mask, segments=segments)
        own_index = kwargs.pop("index", None)  # the dataset's own index column, where it reaches the batch
        if own_index is not None and segments is not None:
            raise ValueError("An `index` column cannot name the examples of packed rows; drop it from the batch "
                             "(SQSDCallback then finds each packed example by its tokens).")
        self._pending.append(_MicroBatch(batch, own_index=own_index))
        self._num_items = kwargs.get("num_items_in_batch")
        if self.sets:
            self.engine.start(batch)
        return args, kwargs

    def _on_outputs(self, module, args, kwargs, outputs):
        """Read each row's per-token loss weight off the backward pass (through the model's own loss, ``sum /
        num_items_in_batch`` or a mean, or TRL's per-token ``log_probs``) and queue ``_after_backward``."""
        if not self._pending or not module.training or not torch.is_grad_enabled():
            return
        mb = self._pending[-1]
        labels = mb.batch.labels
        log_probs, loss = getattr(outputs, "log_probs", None), getattr(outputs, "loss", None)
        if isinstance(log_probs, torch.Tensor) and log_probs.requires_grad and log_probs.shape[0] == labels.shape[0]:
            shifted = log_probs.shape[1] == labels.shape[1] - 1
            scored = targets_scored(labels) if shifted else labels != IGNORE_INDEX
            anchor_tensor = log_probs

            def read_weights(g):  # the loss sums −log_probs over every position: read only scored ones
                tok = torch.zeros(labels.shape, device=g.device)
                tok[:, labels.shape[1] - g.shape[1]:] = -g.detach().float() * scored.to(g.device)
                mb.weight = mb.batch.sum_per_example(tok) / mb.batch.n_scored.to(g.device).clamp(min=1)
                self._queue_after_backward(mb)
        elif isinstance(loss, torch.Tensor) and loss.requires_grad:
            denom = self._num_items if self._num_items is not None else scored_tokens(labels).sum()
            anchor_tensor = loss

            def read_weights(g):
                w = g.detach().float() / torch.as_tensor(denom, device=g.device).float()
                mb.weight = w.expand(mb.batch.n_examples)
                self._queue_after_backward(mb)
        else:
            anchor_tensor = next((t for t in (getattr(outputs, "logits", None), loss, log_probs)
                                  if isinstance(t, torch.Tensor) and t.requires_grad), None)
            if anchor_tensor is None:
                return

            def read_weights(g):
                self._queue_after_backward(mb)
        anchor_tensor.register_hook(read_weights)

    def _queue_after_backward(self, mb: _MicroBatch) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(lambda: self._after_backward(mb))

    def _after_backward(self, mb: _MicroBatch) -> None:
        """The micro-batch's gradients are all accumulated and not yet clipped: score it and remove dropped
        examples; on the step's last micro-batch renormalise and add the anchor's gradient. Under DDP, edits of
        gradients that DDP reduces in this pass wait until it has written the averages (then reduced themselves)."""
        if self.sets:
            mb.stats = self.engine.finish()
        if self.drop.active:  # decided now: the decisions edit this micro-batch's gradients
            mb.rows = self._rows(mb)
            self._decide(mb)
            removed = self._dropped_grads(mb)
            if self.procs.reduces_in_backward and grads_reduced_now():
                for p, g in removed:
                    held = self._removal.get(id(p))
                    self._removal[id(p)] = (p, g if held is None else held[1] + g)
            else:
                self._subtract(removed)
        from accelerate.state import GradientState
        if not GradientState().sync_gradients:
            return
        if self.procs.reduces_in_backward:
            after_queued_callbacks(self._finish_step_grads)
        else:
            self._finish_step_grads()

    def _finish_step_grads(self) -> None:
        """The step's gradients are complete (and reduced): apply held removals, renormalise, add the anchor."""
        if self.drop.active:
            held, self._removal = list(self._removal.values()), {}
            if held:  # every rank's removals, averaged as DDP averaged the gradients
                summed = self.procs.sum([g for _, g in held])
                self._subtract([(p, g / self.procs.world) for (p, _), g in zip(held, summed)])
            self._renormalise()
        if self.anchor is not None:
            self._anchor_value = self.anchor.add_grad()

    # ---------------------------------------------------------------- drops
    def _decide(self, mb: _MicroBatch) -> None:
        """Mark the micro-batch's rows dropped or kept. Every rank decides on every rank's rows of this micro-step
        (the same policy state everywhere, so z-score statistics and the dropped set agree) and keeps its own."""
        mine = [(self.procs.rank, r["index"], r["sqsd"]) for r in mb.rows]
        every = self.procs.gather(mine)
        decisions = self.drop.decide([{"index": i, "sqsd": s} for _, i, s in every])
        own = [d for (rank, _, _), d in zip(every, decisions) if rank == self.procs.rank]
        for r, d in zip(mb.rows, own):
            r["dropped"] = d
        keep = torch.tensor([not d for d in own])
        mb.kept_tokens = int((mb.batch.n_scored.cpu() * keep).sum())

    def _dropped_grads(self, mb: _MicroBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each scored parameter with the summed gradients (as the step weighted them) of the micro-batch's dropped
        examples; the engine's kept per-example tensors are released."""
        drop_idx = torch.tensor([i for i, r in enumerate(mb.rows) if r["dropped"]], dtype=torch.long,
                                device=mb.batch.input_ids.device)
        return list(self.engine.removed(drop_idx))

    @staticmethod
    @torch.no_grad()
    def _subtract(removed: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for p, g in removed:
            if p.grad is not None:
                p.grad.sub_(g.to(p.grad.dtype))

    def _renormalise(self) -> None:
        """Scale the step's remaining gradient from 1/N to 1/N' (N' the scored tokens left, over every process);
        skip the step (no gradient at all) when nothing is left."""
        step = [mb for mb in self._pending if mb.rows is not None]
        weights = [float(mb.weight.mean()) for mb in step if mb.weight is not None]
        if len(weights) != len(step) or max(weights) - min(weights) > 1e-4 * max(abs(w) for w in weights):
            raise RuntimeError("Exact drops need the loss normalised by the step's scored-token count "
                               "(num_items_in_batch, the Trainer's and SFTTrainer's default); this run's "
                               "micro-batches weight tokens differently.")
        counts = torch.tensor([sum(int(mb.batch.n_scored.sum()) for mb in step),
                               sum(mb.kept_tokens for mb in step)], dtype=torch.float64)
        total, kept = (int(c) for c in self.procs.sum([counts])[0])
        with torch.no_grad():
            for p in self.params:
                if p.grad is None:
                    continue
                if kept == 0:
                    p.grad = None
                elif kept != total:
                    p.grad.mul_(total / kept)

    def _check_processes(self, model) -> None:
        """Refuse, before the first step, what the run's multi-process engine cannot do exactly."""
        procs = self.procs
        if procs.engine == "fsdp" and procs.fsdp_version != 2:
            raise ValueError("SQSDCallback does not support FSDP1 (FullyShardedDataParallel's flat parameters hide "
                             "the LoRA factors from the scoring taps). Use FSDP2: fsdp_version: 2 in the accelerate "
                             "config, or TrainingArguments(fsdp_config={'fsdp_version': 2}).")
        if procs.engine in ("fsdp", "deepspeed") and (self.drop.active or self.anchor is not None):
            what = "FSDP2" if procs.engine == "fsdp" else f"DeepSpeed ZeRO-{procs.zero_stage}"
            raise ValueError(f"Drops and the anchor edit the step's gradients, which {what} reduces and shards in "
                             f"its own buffers; under {what} they are not supported. Monitoring (scores, drift, "
                             f"stop_drift_above) works; for drops or the anchor train with DDP or one process.")
        if procs.engine in ("fsdp", "deepspeed") and not ENGINES[self.engine_name].from_step:
            raise ValueError(f"engine={self.engine_name!r} runs extra passes outside the training step, which "
                             f"FSDP2 and DeepSpeed do not shard for it; use engine='hooks' (the default).")

    # ---------------------------------------------------------------- stop
    def _check_stop(self, state, control) -> None:
        below = self._last_drift["drift"] <= self.stop.threshold
        if self.stop.update(state.global_step, self._last_drift["drift"]):
            control.should_training_stop = True
            reason = (f"sqsd: stopping at step {state.global_step}: drift {self._last_drift['drift']:+.4f} above "
                      f"{self.stop.threshold} for {self.stop.patience} step(s); last step below it: "
                      f"{self.stop.last_safe_step}")
            if self.save_last_safe and self._safe_params is not None:
                path = self._save_safe()
                reason += f", its adapter saved to {path}"
            logger.warning(reason)
            if self.main:
                (self.out / "stop.json").write_text(json.dumps({
                    "step": state.global_step, "drift": self._last_drift["drift"], "threshold": self.stop.threshold,
                    "patience": self.stop.patience, "last_safe_step": self.stop.last_safe_step, "reason": reason}))
        elif below and self.save_last_safe:
            self._keep_safe_params()

    def _full_parameters(self):
        """A context in which the trained parameters hold their full values (FSDP2 / ZeRO-3 gather them)."""
        return full_parameters(self.model, self.params)

    def _keep_safe_params(self) -> None:
        with self._full_parameters():
            self._safe_params = {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()
                                 if n in self._param_names}

    def _save_safe(self) -> Path:
        """Write the model as it was at the last safe step: its saved state with the kept trained values (a PEFT
        model saves its adapter from them); the live parameters are not touched."""
        path = self.out / "last_safe"
        from peft import PeftModel
        state = self._safe_params if isinstance(self.model, PeftModel) else {**self.model.state_dict(),
                                                                              **self._safe_params}
        if self.main:
            self.model.save_pretrained(str(path), state_dict=state)
            (path / "sqsd_step.json").write_text(json.dumps({"step": self.stop.last_safe_step}))
        return path

    # --------------------------------------------------------------- helpers
    def _rows(self, mb: _MicroBatch) -> list[dict]:
        """Score rows of a micro-batch; its examples are identified on a host copy of the batch."""
        host = mb.batch.to("cpu")
        host.index = mb.own_index.tolist() if mb.own_index is not None else self.index.lookup(host.example_ids())
        mb.batch.index = host.index
        self._note_texts(host)
        out = rows(project(mb.stats, self.bank, self.metric, self._scale(mb)), self.bank, host.n_scored, host.index)
        for r in out:
            r["dropped"] = False
        return out

    def _note_texts(self, batch: Batch) -> None:
        """Write each example's decoded text once (``examples.jsonl``) for reports and tables."""
        if self.tokenizer is None:
            return
        new = []
        for i, ids in zip(batch.index, batch.example_ids()):
            if i is not None and i not in self._seen:
                self._seen.add(i)
                ids = ids.tolist()
                new.append({"index": i, "text": self.tokenizer.decode(ids, skip_special_tokens=True)[:_TEXT_CHARS]})
                if self.dashboard is not None:
                    self._texts[i] = new[-1]["text"][:200]
        self._new_texts += new

    def _scale(self, mb: _MicroBatch) -> torch.Tensor | None:
        """Per-row factor turning the hook gradient (loss weight w per token) into the example's mean-loss
        gradient: 1 / (w · n_scored). Only the ``projection`` metric depends on it."""
        if not self.engine.from_step:  # the oracles' stats are per example already
            return None
        if mb.weight is None:
            if self.metric == "projection":
                self._warn_once("weights", "SQSDCallback could not read the loss weights (no `loss` or `log_probs` "
                                "in the model outputs): projection scores are in the units of the Trainer's loss "
                                "normalisation, not per example.")
            return None
        w = mb.weight * mb.batch.n_scored.to(mb.weight.device).float()
        return torch.where(w != 0, 1.0 / torch.where(w != 0, w, torch.ones_like(w)), torch.zeros_like(w))

    def _write(self, name: str, rows: list[dict]) -> None:
        """Append to one of the run's files: the main process writes for all."""
        if name in self.files:
            self.files[name].write(rows)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What a resumed run needs: θ_0 for drift and the last safe weights (tensors), the rest as JSON."""
        tensors = {f"drift/{k}": v for k, v in (self.drift.state_tensors() if self.sets else {}).items()}
        tensors.update({f"safe/{n}": v for n, v in (self._safe_params or {}).items()})
        meta = {"drop": self.drop.state_dict(), "stop": self.stop.state_dict() if self.stop else None,
                "seen": sorted(self._seen), "window": [self._window.values, self._window.dropped],
                "last_drift": self._last_drift, "has_safe": self._safe_params is not None}
        return tensors, meta

    def _resume(self, args, state) -> None:
        """Restore the state saved with the checkpoint training resumes from and cut the logs back to it."""
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
        if not ckpt.is_file():
            raise FileNotFoundError(f"Resuming at step {state.global_step} but {ckpt} is missing: the checkpoint was "
                                    f"written by a run without SQSDCallback, or the run was killed while saving it. "
                                    f"Resume from an earlier checkpoint, or start a new run (new output_dir).")
        tensors, saved = load_state(ckpt)
        if self.sets:
            self.drift.load_state_tensors(split("drift", tensors))
        self.drop.load_state_dict(saved["drop"])
        if self.stop is not None and saved["stop"] is not None:
            self.stop.load_state_dict(saved["stop"])
        self._seen = set(saved["seen"])
        self._window.values, self._window.dropped = saved["window"]
        self._last_drift = saved["last_drift"]
        if saved["has_safe"]:
            self._safe_params = split("safe", tensors)
        if self.main:
            truncate_jsonl(self.out / "scores.jsonl", lambda r: r["step"] < state.global_step)
            truncate_jsonl(self.out / "drift.jsonl", lambda r: r["step"] <= state.global_step)
            truncate_jsonl(self.out / "examples.jsonl", lambda r: r["index"] in self._seen)

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
            self._warn_once("order", "SQSDCallback could not find the Trainer's callback list; sqsd/* scalars reach "
                            "the log history and the callbacks that run after it.")
            return
        handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)

    def _describe(self, args) -> dict:
        return {
            "metric": self.metric,
            "engine": self.engine_name,
            "sets": [{"key": k, "kind": s.kind, "name": s.name, "source": s.source,
                      "modules": int(self.bank.present[:, i].sum()),
                      "norm": float(self.bank.v_norm[:, i].pow(2).sum().sqrt())}
                     for i, (k, s) in enumerate(zip(self.bank.keys, self.sets))] if self.sets else [],
            "modules": self.bank.modules if self.sets else [],
            "duplicate_examples": self.index.duplicates,
            "drop": {k: getattr(self.drop, k) for k in ("above", "top_fraction", "zscore_above", "min_history",
                                                         "exclude_dropped")},
            "stop": None if self.stop is None else {"threshold": self.stop.threshold, "patience": self.stop.patience},
            "anchor": None if self.anchor is None else {"set": self.anchor.directions.name,
                                                        "lambda": self.anchor.lam},
        }


def _refuse_same_directions(danger: list[DirectionSet], safety: list[DirectionSet]) -> None:
    """A set passed as danger and as safety cancels itself (SQSD = 0 for every example): refuse it by name."""
    for d in danger:
        for s in safety:
            if d.modules.keys() == s.modules.keys() and all(d.modules[m].same_as(s.modules[m]) for m in d.modules):
                raise ValueError(f"Danger set {d.name!r} and safety set {s.name!r} hold the same directions "
                                 f"(SQSD would be 0 for every example): check the adapter paths "
                                 f"({d.source!r}, {s.source!r}).")
