"""SQSDCallback: per-example SQSD from the training step's own backward pass, the run's drift, and actions.

Glue between Trainer events and the parts, data flowing one way: the recorder notes each micro-batch and calls
back when its backward has finished → the engine's stats → scoring (rows, drift) → policies (drop, stop, anchor;
their gradient edits in ``edits``) → sinks (the run's files, the Trainer's logs, TensorBoard, wandb).
``sqsd_state.safetensors`` rides in every checkpoint.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback
from transformers.utils import logging

from .config import SQSDConfig
from .directions import DirectionBank, DirectionSet, check_sets
from .distributed import Processes, full_parameters, refuse_unsupported
from .drift import Drift, summarize
from .edits import StepEdits, refuse_untracked
from .engines import ENGINES, make_engine
from .engines.base import IGNORE_INDEX
from .identity import ExampleIndex
from .last_safe import LastSafe
from .layers import find_targets, shared_start
from .policies import Anchor, DriftStop, DropPolicy
from .recorder import MicroBatch, Recorder, refuse_losses
from .scoring import project, riskiest, rows
from .sinks import RunFiles, TensorBoardSink, WandbSink, iter_jsonl, set_aside, start_run_dir, truncate_jsonl
from .state import STATE_FILE, history_digest, load_state, save_state, split

_TEXT_CHARS = 600
SHARED_START = 0.5  # mean |cosine| of A factors above which the run and a set share their initialisation
logger = logging.get_logger(__name__)


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
        check_sets(danger, safety, anchor)
        self.sets = [*danger, *safety]
        self.drop = DropPolicy(cfg.drop_above, cfg.drop_top_fraction, cfg.drop_zscore_above, cfg.drop_min_history,
                               cfg.exclude_dropped, cfg.drop_zscore_robust)
        self.stop = DriftStop(cfg.stop_drift_above, cfg.stop_patience) if cfg.stop_drift_above is not None else None
        if not self.sets and (self.drop.active or self.stop is not None):
            raise ValueError("Drop and stop thresholds act on SQSD scores and drift: pass danger=[...] and/or "
                             "safety=[...] direction sets.")
        if not self.sets and anchor is None:
            raise ValueError("SQSDCallback needs at least one direction set: danger=[...] and/or safety=[...].")
        if anchor is None and cfg.changed("anchor_lambda"):
            raise ValueError(f"anchor_lambda={cfg.anchor_lambda} needs anchor=DirectionSet(...) (the aligned "
                             f"directions the AsFT anchor keeps the update to).")
        self.anchor = Anchor(anchor, cfg.anchor_lambda) if anchor is not None else None
        self.policies = [p for p in (self.drop, self.stop, self.anchor) if p is not None]
        self._initial = {p.name: p.state_dict() for p in self.policies}  # what a new run starts from
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, processing_class=None,
                       **kwargs):
        cfg, self.model = self.config, model
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.targets = find_targets(model)
        if self.anchor is not None:
            self.anchor.bind(self.targets)
        self.params = [p for t in self.targets.values() for p in t.params if p.requires_grad]
        if self.drop.active:
            refuse_untracked(model, self.params)
        for warning in refuse_losses(args, model):
            logger.warning(f"sqsd: {warning}")
        self.procs = Processes.current()
        refuse_unsupported(self.procs, self.drop.active or self.anchor is not None, cfg.engine,
                           ENGINES[cfg.engine].from_step)
        self.engine = None
        if self.sets:
            self.bank = DirectionBank(self.sets, {m: t.shape for m, t in self.targets.items()}).to(
                self.params[0].device)
            self.engine = make_engine(cfg.engine, self.targets, self.bank, keep_grads=self.drop.active, model=model)
            self.drift = Drift(self.targets, self.bank, gather=lambda: full_parameters(model, self.params),
                               sample=cfg.drift_sample)
        names = {id(p): n for n, p in model.named_parameters()}
        self.last_safe = LastSafe(model, self.params, {names[id(p)] for p in self.params}) \
            if cfg.save_last_safe else None
        self.main = state.is_world_process_zero
        self.index = ExampleIndex(getattr(train_dataloader, "dataset", None))
        if self.index.packed:
            logger.warning("sqsd: the training dataset is packed, so `index` numbers examples in packed order, not "
                           "the rows of the dataset you passed (packing reorders them and keeps no row id); "
                           "sqsd_callback.dataset_examples(trainer.train_dataset)[index] gives an example's tokens, "
                           "and examples.jsonl its text.")
        self.out = Path(cfg.output_dir or Path(args.output_dir) / "sqsd")
        self._seen, self._new_texts, self._top = set(), [], []
        self._window, self._last_drift = _LogWindow(), {}
        for p in self.policies:  # a callback passed to a second run (hyperparameter search) starts it afresh
            p.load_state_dict(self._initial[p.name])
        if state.global_step > 0:
            self._resume(*self._saved_state(args, state))
        try:  # before any step: a folder that cannot be written is refused here, with what to do
            if self.main and state.global_step > 0:
                self._cut_back(state.global_step)
            elif self.main:
                start_run_dir(self.out)
            self.sinks = self._sinks(args) if self.main else []
        except OSError as err:
            raise OSError(err.errno, f"SQSDCallback cannot write its files in {self.out} ({err.strerror or err}): "
                                     f"free space there, or point SQSDConfig(output_dir=...) at a writable folder "
                                     f"with room.") from err
        if state.global_step == 0 and self.last_safe is not None:  # θ_0, where the run starts, is safe
            self.last_safe.keep()
        if state.global_step == 0 and self.main:
            self._warn_shared_start()
        self.edits = StepEdits(self.drop, self.anchor, self.engine, self.procs, self.params)
        self.recorder = Recorder(self.engine, self._after_backward)
        self.recorder.attach(model)

    def _warn_shared_start(self) -> None:
        """Warn when the run's adapter starts from a direction set's own random A (the same seed, rank and
        modules): its scores and drift would then measure that shared start before the data."""
        sets = [*self.sets, *([self.anchor.directions] if self.anchor is not None else [])]
        for s in sets:
            cosine, modules = shared_start(self.targets, s)
            if cosine > SHARED_START:
                logger.warning(
                    f"sqsd: the run's LoRA A factors start where direction set {s.name!r} ({s.source or 'in memory'}) "
                    f"has its own: mean |cosine| {cosine:.2f} over {modules} modules, where independent "
                    f"initialisations give about 0. Both adapters were initialised from the same random seed, so "
                    f"every update lies in the set's row space and the first steps' scores and drift measure that "
                    f"shared start, not the data. Initialise the run's adapter from another seed "
                    f"(transformers.set_seed(...) before peft.get_peft_model) or rebuild the set with another seed.")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for mb in self.recorder.pending:
            if mb.stats is None and self.sets:  # oracle engines: extra passes at the step's parameters
                if self.engine.from_step:
                    self._missed_backward()
                mb.stats, mb.recomputed = self.engine.compute(self.model, mb.batch), self.engine.from_step

    def _missed_backward(self) -> None:
        """The step's backward never reached the model's own loss (a compute_loss that builds another from the
        logits): nothing could act on the step's gradients, and scores need an extra pass."""
        if self.drop.active or self.anchor is not None:
            raise RuntimeError("The training step's backward did not pass through the model's own loss (a "
                               "compute_loss that builds its own from the logits?), so drops and the anchor could "
                               "not act on its gradients before this optimizer step. Return the model's "
                               "outputs.loss from compute_loss, or train without drops and the anchor.")
        self._warn_once("recomputed", "The training step's backward did not pass through the model's own loss (a "
                        "compute_loss that builds its own?): SQSDCallback scores each micro-batch by an extra "
                        "forward and backward pass at the step's parameters, exact but slower.")

    def on_step_end(self, args, state, control, **kwargs):
        step = self.recorder.take()
        for mb in step:
            if mb.rows is None and mb.stats is not None:
                mb.rows = self._rows(mb)
        step_rows = self.procs.gather([r for mb in step if mb.rows for r in mb.rows])
        texts, self._new_texts = self.procs.gather(self._new_texts), []
        for r in step_rows:
            r.update(step=state.global_step - 1, epoch=state.epoch)
            self._window.dropped += bool(r["dropped"])
            if r["sqsd"] is not None:
                self._window.values.append(r["sqsd"])
        if step_rows and all(r["sqsd"] is None for r in step_rows):
            self._warn_once("unscored", f"No example of optimizer step {state.global_step - 1} has a scored token "
                            f"(every label is -100): nothing was trained or scored. Check the loss mask (e.g. "
                            f"completion_only_loss / assistant_only_loss and the chat template).")
        drift = None
        if self.sets:
            self._top = riskiest(self._top + step_rows, self.config.top_k)
            measured = self.drift.measure()
            self._last_drift = summarize(measured, self.bank)
            drift = {"step": state.global_step, "epoch": state.epoch, **self._last_drift,
                     **{f"cosine/{k}": v for k, v in zip(self.bank.keys, measured["cosine"])},
                     **{f"projection/{k}": v for k, v in zip(self.bank.keys, measured["projection"])},
                     "norm": measured["norm"], "layers": measured["layers"]}
        for sink in self.sinks:
            sink.step(state.global_step, step_rows, drift, texts)
        if self.stop is not None:
            self._check_stop(state, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the ``sqsd/*`` scalars to the Trainer's logs (the history and the callbacks after this one) and
        send them to this run's sinks (the reporting backends before it in the Trainer's list do not see them)."""
        if logs is None or "loss" not in logs:
            return
        scalars = {f"sqsd/{k}": v for k, v in self._last_drift.items() if v is not None}
        values = list(self._window.values)
        if self.sets:
            scalars.update(self._window.pop())
        if self.edits.anchor_value is not None:
            scalars["sqsd/anchor_penalty"] = self.edits.anchor_value
        logs.update(scalars)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)
        for sink in self.sinks:
            sink.log(state.global_step, scalars, values, self._top)

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero:
            return
        if not ckpt.is_dir():
            self._warn_once("no-checkpoint", f"SQSDCallback found no checkpoint folder {ckpt} to save its state in "
                            f"(a Trainer that saves elsewhere, e.g. hyperparameter search's run-* folders): a run "
                            f"resumed from this checkpoint cannot restore the monitor's state.")
            return
        try:
            save_state(ckpt / STATE_FILE, *self._state(state))
        except OSError as err:  # a full disk must not end the run; resuming from this checkpoint will say so
            self._warn_once(f"state:{err.errno}", f"SQSDCallback could not write {ckpt / STATE_FILE} ({err}); "
                            "training goes on, but this checkpoint cannot resume the monitor's state.")

    def on_train_end(self, args, state, control, **kwargs):
        self.recorder.detach()
        for sink in self.sinks:
            sink.close()

    # ------------------------------------------------------------- the step
    def _after_backward(self, mb: MicroBatch) -> None:
        """The micro-batch's gradients are all accumulated and not yet clipped: score it and drop examples; on the
        step's last micro-batch finish the step's gradient edits."""
        if self.engine is not None:
            mb.stats = self.engine.finish()
        if self.drop.active:  # decided now: the decisions edit this micro-batch's gradients
            mb.rows = self._rows(mb)
            self.edits.drop_examples(mb)
        from accelerate.state import GradientState
        if GradientState().sync_gradients:
            self.edits.step_complete(self.recorder.pending)

    def _rows(self, mb: MicroBatch) -> list[dict]:
        """Score rows of a micro-batch; its examples are identified (and first-seen texts noted) on a host copy."""
        host = mb.batch.to("cpu")
        host.index = mb.own_index.tolist() if mb.own_index is not None else self.index.lookup(host.example_ids())
        mb.batch.index = host.index
        if self.tokenizer is not None:
            for i, ids, labels in zip(host.index, host.example_ids(), host.example_labels()):
                if i is not None and i not in self._seen:
                    self._seen.add(i)
                    self._new_texts.append({"index": i, **self._texts(ids, labels)})
        scale = None
        if self.engine.from_step and not mb.recomputed:  # hook gradients carry the step's loss weights
            scale = mb.scale()
            if scale is None and self.config.metric == "projection":
                self._warn_once("weights", "SQSDCallback could not read the loss weights (no `loss` or `log_probs` "
                                "in the model outputs): projection scores are in the units of the Trainer's loss "
                                "normalisation, not per example.")
        out = rows(project(mb.stats, self.bank, self.config.metric, scale), self.bank, host.n_scored, host.index)
        for r in out:
            r["dropped"] = False
        return out

    def _texts(self, ids, labels) -> dict[str, str]:
        """An example's decoded ``text`` (its start) and, split at its first scored token, the end of its ``prompt``
        (the user's turn, after any system prompt the chat template put first) and the start of its ``response``."""
        decode = lambda t: self.tokenizer.decode(t.tolist(), skip_special_tokens=True)  # noqa: E731
        scored = (labels != IGNORE_INDEX).nonzero()
        first = int(scored[0]) if len(scored) else len(ids)
        return {"text": decode(ids)[:_TEXT_CHARS], "prompt": decode(ids[:first])[-_TEXT_CHARS // 2:],
                "response": decode(ids[first:])[:_TEXT_CHARS // 2]}

    def _check_stop(self, state, control) -> None:
        drift = self._last_drift["drift"]
        if not self.stop.update(state.global_step, drift):
            if drift <= self.stop.threshold and self.last_safe is not None:
                self.last_safe.keep()
            return
        control.should_training_stop = True
        reason = (f"sqsd: stopping at step {state.global_step}: drift {drift:+.4f} above {self.stop.threshold} for "
                  f"{self.stop.patience} step(s); last step below it: {self.stop.last_safe_step}")
        try:  # a full disk must not turn the stop into a crash: the run stops either way
            if self.last_safe is not None and self.last_safe.tensors is not None:
                path = self.last_safe.save(self.out / "last_safe", self.stop.last_safe_step, self.main)
                reason += f", its adapter saved to {path}"
            if self.main:
                (self.out / "stop.json").write_text(json.dumps({
                    "step": state.global_step, "drift": drift, "threshold": self.stop.threshold,
                    "patience": self.stop.patience, "last_safe_step": self.stop.last_safe_step, "reason": reason}))
        except OSError as err:
            reason += f"; writing the last safe adapter or stop.json in {self.out} failed ({err})"
        logger.warning(reason)

    # ----------------------------------------------------- sinks and state
    def _sinks(self, args) -> list:
        report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
        described = self._describe()
        (self.out / "run.json").write_text(json.dumps(described, indent=2))
        sinks = [RunFiles(self.out)]
        if "tensorboard" in report_to:
            sinks.append(TensorBoardSink(self.out, getattr(args, "logging_dir", None)))
        if "wandb" in report_to:
            kinds = dict(zip(self.bank.keys, (s.kind for s in self.sets))) if self.sets else {}

            def heatmap():
                from . import plots  # matplotlib, only for the wandb heatmap
                return plots.layer_heatmap(iter_jsonl(self.out / "drift.jsonl"), kinds) if kinds else None
            seen = self.out / "examples.jsonl"  # a resumed run's texts so far (a new run's were moved aside)
            sinks.append(WandbSink(described, self.config.wandb_every, heatmap,
                                   iter_jsonl(seen) if seen.is_file() else ()))
        return sinks

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _state(self, state) -> tuple[dict, dict]:
        """What a resumed run needs: θ_0 for drift and the last safe weights (tensors), the rest as JSON, with the
        fingerprint of the Trainer's history that the checkpoint restores."""
        tensors = {f"drift/{k}": v for k, v in (self.drift.state_tensors() if self.sets else {}).items()}
        safe = self.last_safe.tensors if self.last_safe is not None else None
        tensors.update({f"safe/{n}": v for n, v in (safe or {}).items()})
        meta = {"policies": {p.name: p.state_dict() for p in self.policies},
                "seen": sorted(self._seen), "window": [self._window.values, self._window.dropped],
                "last_drift": self._last_drift, "has_safe": safe is not None, "top": self._top,
                "history": history_digest(state.log_history)}
        return tensors, meta

    def _resume(self, tensors: dict, saved: dict) -> None:
        """Restore the state saved with the checkpoint training resumes from (``_saved_state``)."""
        if self.sets:
            self.drift.load_state_tensors(split("drift", tensors))
        for p in self.policies:
            if p.name in saved["policies"]:
                p.load_state_dict(saved["policies"][p.name])
        self._seen = set(saved["seen"])
        self._window.values, self._window.dropped = saved["window"]
        self._last_drift = saved["last_drift"]
        self._top = saved.get("top", [])
        if saved["has_safe"] and self.last_safe is not None:
            self.last_safe.tensors = split("safe", tensors)

    def _cut_back(self, step: int) -> None:
        """Cut the run's files back to the checkpoint at optimizer step ``step`` that training resumes from."""
        self.out.mkdir(parents=True, exist_ok=True)  # a resume into a new output_dir
        truncate_jsonl(self.out / "scores.jsonl", lambda r: r["step"] < step)
        truncate_jsonl(self.out / "drift.jsonl", lambda r: r["step"] <= step)
        truncate_jsonl(self.out / "examples.jsonl", lambda r: r["index"] in self._seen)
        self._set_aside_later_stop(step)

    def _set_aside_later_stop(self, step: int) -> None:
        """A drift stop recorded after the resumed checkpoint (stop.json and its last_safe/) belongs to the run
        this one replaces: moved to previous-<k>/, not left beside this run's files as if it were its own."""
        stop = self.out / "stop.json"
        if not stop.is_file():
            return
        try:
            recorded = json.loads(stop.read_text())
        except ValueError:  # torn
            recorded = None
        stopped_at = recorded.get("step") if isinstance(recorded, dict) else None
        if isinstance(stopped_at, int) and stopped_at <= step:
            return  # a stop in the history this run resumes: still its own
        dest = set_aside([p for p in (stop, self.out / "last_safe") if p.exists()])
        which = f"the drift stop recorded at step {stopped_at}" if isinstance(stopped_at, int) else \
            "an unreadable stop.json"
        logger.warning(f"sqsd: resuming at step {step}, before {which}: its stop.json and last-safe adapter were "
                       f"moved to {dest}.")

    def _saved_state(self, args, state) -> tuple[dict, dict]:
        """The state saved with the checkpoint being resumed: the Trainer does not say which folder that is, so the
        state beside ``output_dir/checkpoint-<step>`` (or ``args.resume_from_checkpoint``) must carry the history
        that checkpoint restored; another run's state is refused, never loaded."""
        given = getattr(args, "resume_from_checkpoint", None)
        folders = [*([Path(given)] if isinstance(given, str) else []),
                   Path(args.output_dir) / f"checkpoint-{state.global_step}"]
        found = [f / STATE_FILE for f in folders if (f / STATE_FILE).is_file()]
        history = history_digest(state.log_history)
        for path in found:
            tensors, saved = load_state(path)
            if saved.get("history", history) == history:  # states saved before the fingerprint carry none
                return tensors, saved
        where = " or ".join(str(f / STATE_FILE) for f in folders)
        if found:
            raise ValueError(f"Resuming at step {state.global_step}, but {where} was saved by another run (its "
                             f"Trainer history differs from the checkpoint's being resumed). Resume from the "
                             f"checkpoint in output_dir, or pass its folder as TrainingArguments("
                             f"resume_from_checkpoint=...) too, so SQSDCallback finds its state.")
        raise FileNotFoundError(f"Resuming at step {state.global_step} but {where} is missing: the checkpoint was "
                                f"written by a run without SQSDCallback, the run was killed while saving it, or it "
                                f"lies outside output_dir (pass its folder as TrainingArguments("
                                f"resume_from_checkpoint=...) too). Resume from an earlier checkpoint, or start a "
                                f"new run (new output_dir).")

    def _describe(self) -> dict:
        return {
            "metric": self.config.metric,
            "engine": self.config.engine,
            "sets": [{"key": k, "kind": s.kind, "name": s.name, "source": s.source,
                      "modules": int(self.bank.present[:, i].sum()),
                      "norm": float(self.bank.v_norm[:, i].pow(2).sum().sqrt())}
                     for i, (k, s) in enumerate(zip(self.bank.keys, self.sets))] if self.sets else [],
            "modules": self.bank.modules if self.sets else [],
            "duplicate_examples": self.index.duplicates,
            **{p.name: None for p in (DropPolicy, DriftStop, Anchor)},
            **{p.name: p.describe() for p in self.policies},
        }
