"""SQSDCallback: glue between the Trainer's events and the parts, data flowing one way: the recorder notes each
micro-batch and calls back when its backward has finished → the engine's stats → scoring (rows, drift) →
policies (their hooks, in order) → sinks. The monitor's state rides in every checkpoint
(``sqsd_state.safetensors``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from transformers import TrainerCallback

from .config import SQSDConfig
from .directions import DirectionSet, check_sets
from .once import WarnOnce
from .policies import Anchor, SafetyMask, build_policies
from .runtime.distributed import step_ends_now
from .runtime.recorder import MicroBatch, unscored
from .runtime.run import Run, start_run


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
        mask: safety records (dicts with ``input_ids`` and ``labels``) for WaRP's gradient mask: before step 1 each
            module's most important safety input directions are found from them, and every step's gradient loses
            its components along them (options ``mask_*``; logged as sqsd/mask_removed). See docs/masking.md.
    """

    def __init__(self, danger: Sequence[DirectionSet] = (), safety: Sequence[DirectionSet] = (),
                 config: SQSDConfig | None = None, *, anchor: DirectionSet | None = None,
                 mask: Iterable[dict] | None = None, **options) -> None:
        if config is not None and options:
            raise ValueError(f"Pass the options either as config=SQSDConfig(...) or as keywords, not both (got "
                             f"config and {sorted(options)}).")
        if config is not None and not isinstance(config, SQSDConfig):
            raise TypeError(f"config must be an SQSDConfig, got {type(config).__name__}.")
        self.config = config if config is not None else SQSDConfig.from_dict(options)
        danger, safety = list(danger), list(safety)
        check_sets(danger, safety, anchor)
        self.sets = [*danger, *safety]
        self.policies = build_policies(self.config, anchor, mask)
        if not self.sets and any(not isinstance(p, (Anchor, SafetyMask)) for p in self.policies):
            raise ValueError("Drop and stop thresholds act on SQSD scores and drift: pass danger=[...] and/or "
                             "safety=[...] direction sets.")
        if not self.sets and anchor is None and mask is None:
            raise ValueError("SQSDCallback needs at least one direction set: danger=[...] and/or safety=[...].")
        self.initial = [p.state_dict() for p in self.policies]  # what each run starts from
        self.warn = WarnOnce()  # each warning once per callback, also over a hyperparameter search's runs
        self.run: Run | None = None

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, processing_class=None,
                       **kwargs):
        for p, initial in zip(self.policies, self.initial):  # a callback passed to a second run starts it afresh
            p.load_state_dict(initial)
        self.run = start_run(self.config, self.sets, self.policies, self._after_backward, self.warn, args, state,
                             model, train_dataloader, processing_class)
        self.run.recorder.attach(model)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        run = self.run
        for mb in run.recorder.pending:
            if mb.stats is None and self.sets:  # oracle engines: extra passes at the step's parameters
                if run.in_step:
                    self._missed_backward()
                mb.stats, mb.recomputed = run.engine.compute(run.context.model, mb.batch), run.in_step

    def on_step_end(self, args, state, control, **kwargs):
        run = self.run
        step = run.recorder.take()
        for mb in step:
            if mb.rows is None and mb.stats is not None:
                mb.rows = run.rows(mb, run.in_step)
        procs = run.context.procs
        rows, texts = procs.gather([r for mb in step if mb.rows for r in mb.rows]), procs.gather(run.texts.take())
        for r in rows:
            r.update(step=state.global_step - 1, epoch=state.epoch)
        warning = unscored(step, state.global_step - 1)  # each process, its own micro-batches
        if warning:
            self.warn(*warning)
        scalars, drift_row = run.drift.step_row(state.global_step, state.epoch) if run.drift else (None, None)
        run.summary.observe(rows, scalars)
        for sink in run.sinks:
            sink.step(state.global_step, rows, drift_row, texts)
        for p in self.policies:
            p.on_step_end(state.global_step, scalars["drift"] if scalars else None, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the ``sqsd/*`` scalars to the Trainer's logs (the history and the callbacks after this one) and
        send them to this run's sinks (the reporting backends before it in the Trainer's list do not see them)."""
        if logs is None or "loss" not in logs:
            return
        scalars, values = self.run.summary.pop() if self.sets else ({}, [])
        for p in self.policies:
            scalars.update(p.scalars())
        logs.update(scalars)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)
        for sink in self.run.sinks:
            sink.log(state.global_step, scalars, values, self.run.summary.top)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.run.checkpoint.save(args, state, *self.run.state(self.policies))

    def on_train_end(self, args, state, control, **kwargs):
        self.run.recorder.detach()
        for p in self.policies:
            p.on_train_end()
        for sink in self.run.sinks:
            sink.close()

    # ------------------------------------------------------------- the step
    def _after_backward(self, mb: MicroBatch) -> None:
        """The micro-batch's gradients are all accumulated and not yet clipped: score it and let the policies act
        on them; on the step's last micro-batch, once its gradients are complete, the policies' step hooks."""
        run = self.run
        if run.in_step:
            mb.stats = run.engine.finish()
        if any(p.needs_rows for p in self.policies):  # decided now: the decisions edit this micro-batch's gradients
            mb.rows = run.rows(mb, run.in_step)
        for p in self.policies:
            p.on_micro_batch(mb)
        if step_ends_now():
            pending = run.recorder.pending
            run.context.procs.after_reduction(lambda: [p.on_step_complete(pending) for p in self.policies])

    def _missed_backward(self) -> None:
        """The step's backward never reached the model's own loss (a compute_loss that builds another from the
        logits): nothing could act on the step's gradients, and scores need an extra pass."""
        if self.run.recorder.pairs is not None:  # an extra pass scores cross-entropy, not a DPO pair's loss
            raise RuntimeError("The DPO step's backward did not pass through the model's log_probs, so SQSDCallback "
                               "could not read its pairs' gradients. Train with TRL's own DPOTrainer loss.")
        if any(p.edits_gradients for p in self.policies):
            raise RuntimeError("The training step's backward did not pass through the model's own loss (a "
                               "compute_loss that builds its own from the logits?), so drops and the anchor could "
                               "not act on its gradients before this optimizer step. Return the model's "
                               "outputs.loss from compute_loss, or train without drops and the anchor.")
        self.warn("recomputed", "The training step's backward did not pass through the model's own loss (a "
                  "compute_loss that builds its own?): SQSDCallback scores each micro-batch by an extra forward and "
                  "backward pass at the step's parameters, exact but slower.")
