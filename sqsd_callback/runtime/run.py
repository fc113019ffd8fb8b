"""One training run as the monitor sees it, built at train begin: the model's scored layers and the refusals made
before any step, the engine, the direction bank and the drift, the recorder, the run's folder and sinks, and the
state a checkpoint carries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers.utils import logging

from ..bank import DirectionBank
from ..config import SQSDConfig
from ..directions import DirectionSet
from ..drift import Drift
from ..engines import ENGINES, Engine, StepEngine, make_engine
from ..layers import find_targets, shared_start
from ..once import WarnOnce
from ..policies import Anchor, DriftStop, Policy, RunContext, describe
from ..sinks import Sink, SinkContext, check_report_to, make_sinks
from .checkpoint import LATEST_FILE, CheckpointState, under
from .distributed import Processes, full_parameters, refuse_unsupported
from .identity import ExampleIndex
from .preference import preference_pairs
from .recorder import Recorder, refuse_losses
from .rows import ExampleTexts, RowMaker
from .run_folder import RunFolder
from .summary import RunSummary

SHARED_START = 0.5
"""Mean |cosine| of A factors above which the run and a set share their initialisation."""
logger = logging.get_logger(__name__)


@dataclass
class Run:
    """The parts of one run; ``engine``, ``bank``, ``drift`` and ``rows`` are None without direction sets."""

    context: RunContext
    engine: Engine | None
    bank: DirectionBank | None
    drift: Drift | None
    rows: RowMaker | None
    texts: ExampleTexts
    summary: RunSummary
    sinks: list[Sink]
    recorder: Recorder
    checkpoint: CheckpointState

    @property
    def in_step(self) -> bool:
        """Whether the engine scores the step's own passes (else extra passes before the optimizer step)."""
        return isinstance(self.engine, StepEngine)

    def state(self, policies: list[Policy]) -> tuple[dict, dict]:
        """What a resumed run needs: θ_0 for drift and the policies' tensors, the rest as JSON."""
        tensors = {f"drift/{k}": v for k, v in (self.drift.state_tensors() if self.drift else {}).items()}
        for p in policies:
            tensors.update({f"{p.tensors_key}/{k}": v for k, v in p.state_tensors().items()})
        meta = {"policies": {p.name: p.state_dict() for p in policies}, "seen": sorted(self.texts.seen),
                "has_safe": any(k.startswith(f"{DriftStop.tensors_key}/") for k in tensors),
                **self.summary.state_dict()}
        return tensors, meta

    def restore(self, tensors: dict, saved: dict, policies: list[Policy]) -> None:
        """Restore a state ``state`` saved."""
        if self.drift is not None:
            self.drift.load_state_tensors(under("drift", tensors))
        for p in policies:
            if p.name in saved["policies"]:
                p.load_state_dict(saved["policies"][p.name])
            p.load_state_tensors(under(p.tensors_key, tensors))
        self.texts.seen = set(saved["seen"])
        self.summary.load_state_dict(saved)


def start_run(config: SQSDConfig, sets: list[DirectionSet], policies: list[Policy], on_backward, warn: WarnOnce,
              args, state, model, train_dataloader, processing_class) -> Run:
    """Build the run, refusing before any step what cannot be scored or acted on exactly; on a resume, restore the
    state saved with the checkpoint. The recorder calls ``on_backward(micro_batch)`` once it is attached; ``warn``
    gives the run's warnings, each once per callback."""
    targets = find_targets(model)
    params = [p for t in targets.values() for p in t.params if p.requires_grad]
    report_to = check_report_to(args.report_to)  # on every process, before anything is written
    pairs = preference_pairs(args, model, config.engine, any(p.edits_gradients for p in policies))  # DPO, or None
    for warning in refuse_losses(args, model) if pairs is None else []:
        logger.warning(f"sqsd: {warning}")
    procs = Processes.current()
    edits = any(p.edits_gradients for p in policies)
    refuse_unsupported(procs, edits, config.engine, issubclass(ENGINES[config.engine], StepEngine))
    engine = bank = drift = None
    if sets:
        bank = DirectionBank(sets, {m: t.shape for m, t in targets.items()}).to(params[0].device)
        engine = make_engine(config.engine, targets, bank, keep_grads=config.drops, model=model)
        drift = Drift(targets, bank, gather=lambda: full_parameters(model, params), sample=config.drift_sample)
    folder = RunFolder(config.output_dir or Path(args.output_dir) / "sqsd", state.is_world_process_zero)
    fresh = state.global_step == 0
    context = RunContext(model, targets, params, procs, engine if isinstance(engine, StepEngine) else None, folder,
                         fresh)
    for p in policies:
        p.bind(context)
    dataset = getattr(train_dataloader, "dataset", None)
    index = ExampleIndex(dataset if pairs is None else pairs.examples(dataset))
    if index.packed:
        logger.warning("sqsd: the training dataset is packed, so `index` numbers examples in packed order, not the "
                       "rows of the dataset you passed (packing reorders them and keeps no row id); "
                       "sqsd_callback.dataset_examples(trainer.train_dataset)[index] gives an example's tokens, "
                       "and examples.jsonl its text.")
    texts = ExampleTexts(getattr(processing_class, "tokenizer", processing_class))
    run = Run(context, engine, bank, drift, RowMaker(bank, config.metric, index, texts, warn) if sets else None, texts,
              RunSummary(config.top_k), [], Recorder(context.engine, on_backward, pairs),
              CheckpointState(warn, folder.path / LATEST_FILE))
    if not fresh:
        run.restore(*run.checkpoint.find(args, state), policies)
    folder.open(state.global_step, texts.seen)
    if folder.main:
        described = _describe(config, sets, bank, index, policies)
        folder.write_run(described)
        kinds = dict(zip(bank.keys, (s.kind for s in sets))) if sets else {}
        with folder.writing():
            run.sinks = make_sinks(report_to, SinkContext(folder.path, args, described, config.wandb_every,
                                                               kinds))
        if fresh:
            _warn_shared_start(targets, [*sets, *(p.directions for p in policies if isinstance(p, Anchor))])
    return run


def _describe(config: SQSDConfig, sets: list[DirectionSet], bank: DirectionBank | None, index: ExampleIndex,
              policies: list[Policy]) -> dict:
    """run.json: the metric, the engine, each set (its modules and norm), duplicates and the policies."""
    return {
        "metric": config.metric,
        "engine": config.engine,
        "sets": [{"key": k, "kind": s.kind, "name": s.name, "source": s.source,
                  "modules": int(bank.present[:, i].sum()), "norm": float(bank.v_norm[:, i].pow(2).sum().sqrt())}
                 for i, (k, s) in enumerate(zip(bank.keys, sets))] if sets else [],
        "modules": bank.modules if sets else [],
        "duplicate_examples": index.duplicates,
        **describe(policies),
    }


def _warn_shared_start(targets: dict, sets: list[DirectionSet]) -> None:
    """Warn when the run's adapter starts from a direction set's own random A (the same seed, rank and modules):
    its scores and drift would then measure that shared start before the data."""
    for s in sets:
        cosine, modules = shared_start(targets, s)
        if cosine > SHARED_START:
            logger.warning(
                f"sqsd: the run's LoRA A factors start where direction set {s.name!r} ({s.source or 'in memory'}) "
                f"has its own: mean |cosine| {cosine:.2f} over {modules} modules, where independent initialisations "
                f"give about 0. Both adapters were initialised from the same random seed, so every update lies in "
                f"the set's row space and the first steps' scores and drift measure that shared start, not the "
                f"data. Initialise the run's adapter from another seed (transformers.set_seed(...) before "
                f"peft.get_peft_model) or rebuild the set with another seed.")
