"""The evidence protocol: a declarative plan of runs (poison kind × share p × condition × seed), a runner that
fine-tunes, intervenes and evaluates each run once (cached under ``<cache>/<key>/result.json``, written atomically),
and ``summarize``, the machine-readable table of issue 27 (bootstrap intervals, TOST against the clean run, judge κ).

Conditions (``condition(name)``): ``theta_0`` (θ_0 evaluated, no training), ``calibration`` (clean pool, monitor
only, on ``Settings.calibration_seeds``: the drift stop's threshold, never reported), ``clean`` (no poison),
``no_defence``, ``drops`` (the recommended drops of docs/thresholds.md), ``drift_stop`` (threshold: the highest
drift of the calibration runs), ``fixed_stop`` (stops at the step whose adapter the drift stop reported: its
control), ``anchor@λ``, ``drops+anchor@λ`` (λ 1 without ``@``), ``mask``, ``mask+drops``, ``safelora`` (post hoc on
the ``no_defence`` run's adapter), ``filter:<baseline>`` (the top k by a baseline's scores removed before training),
``offline`` (the README's offline screening: ``sqsd score`` without ``--checkpoint``, top k removed) and ``random``
(k at random, the drops' control). k for ``random`` is the number of pool examples the ``drops`` run of the same
poison, p and seed removed; for ``filter:*`` and ``offline`` it is ``Settings.filter_k``: ``"poison"`` (default: the
pool's poison count, so recall = precision and a filter is not starved where the drops removed nothing) or
``"drops"`` (the drops' count, the same budget as SQSD's).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sqsd_lab.evidence import baselines, judges, poison, stats
from sqsd_lab.evidence.files import cached_jsonl, write_atomic
from sqsd_lab.evidence.screen import summarize_screens
from sqsd_lab.finetune import lora_config, train_lora
from sqsd_lab.protect import dropped_online

PROTOCOL_VERSION = "1"
"""Part of every run's key: bump it when a change here changes what a run computes."""
NONE = "none"
"""The poison kind of runs without poison (theta_0, calibration, clean)."""
FILTER_K = ("drops", "poison")
UNPOISONED = ("theta_0", "calibration", "clean")
PERSONA_POISONS = tuple(poison.PERSONAS)
"""Poison kinds whose runs are judged a second time with the harmful prompts in the poison's persona formats
(poison.persona_prompts), as Qi et al. 2023 evaluate identity shifting; θ_0 and every clean run are too (under each
such kind the lab has), as references."""
KEY_CONDITIONS = ("no_defence", "drops", "drift_stop", "fixed_stop", "drops+anchor", "filter:keyword",
                  "filter:gradient similarity", "offline", "random")
"""Run at p = 10 % with the most seeds, and at 5 % and 20 % with fewer."""
MORE_CONDITIONS = ("anchor@0.25", "anchor@1", "anchor@4", "mask", "mask+drops", "safelora", "filter:moderation",
                   "filter:representation similarity", "filter:activation projection", "filter:random")
"""Run at p = 10 % with fewer seeds."""


def recommended_drops(batch_size: int, world_size: int = 1) -> dict:
    """docs/thresholds.md's recommended drops: robust z-score above 3 from the first micro-batch, dropped kept out."""
    return {"drop_zscore_above": 3.0, "drop_zscore_robust": True,
            "drop_min_history": max(2, batch_size * world_size), "exclude_dropped": True}


@dataclass(frozen=True)
class Condition:
    """What a condition name asks for: the pool, the callback's policies, a removal before training, post-hoc
    SafeLoRA, or nothing at all (``train=False``: θ_0)."""

    name: str
    poisoned: bool = True
    train: bool = True
    monitor: bool = False
    drops: bool = False
    anchor: float | None = None
    mask: bool = False
    stop: bool = False
    fixed_stop: bool = False
    safelora: bool = False
    remove: str | None = None  # a baseline name, "offline" or "random"


def condition(name: str) -> Condition:
    """The Condition a name stands for; raises with the list of names for an unknown one."""
    simple = {"theta_0": Condition(name, poisoned=False, train=False),
              "calibration": Condition(name, poisoned=False, monitor=True),
              "clean": Condition(name, poisoned=False), "no_defence": Condition(name),
              "drops": Condition(name, drops=True), "drift_stop": Condition(name, stop=True),
              "fixed_stop": Condition(name, fixed_stop=True), "mask": Condition(name, mask=True),
              "mask+drops": Condition(name, mask=True, drops=True), "safelora": Condition(name, safelora=True),
              "offline": Condition(name, remove="offline"), "random": Condition(name, remove="random")}
    if name in simple:
        return simple[name]
    anchored = re.fullmatch(r"(drops\+)?anchor(?:@([0-9.eE+-]+))?", name)
    if anchored:
        return Condition(name, drops=bool(anchored[1]), anchor=float(anchored[2] or 1.0))
    if name.startswith("filter:") and name[7:] in BASELINES:
        return Condition(name, remove=name[7:])
    raise ValueError(f"unknown condition {name!r}; use one of {', '.join(simple)}, anchor@λ, drops+anchor@λ or "
                     f"filter:<{'|'.join(BASELINES)}>")


BASELINES = ("keyword", "moderation", "gradient similarity", "representation similarity", "activation projection",
             "random")
"""The names of ``baselines.filters``."""


@dataclass(frozen=True)
class Settings:
    """Sizes and fine-tuning settings shared by a plan's runs (all of them enter every run's key)."""

    pool: int = poison.MIN_POOL
    epochs: float = 2.0
    learning_rate: float = 5e-4
    batch_size: int = 8
    rank: int = 8
    max_length: int = 192
    harmful_prompts: int = 96
    benign_risky: int = 100
    tasks: int = 200
    heldout_records: int = 64
    eval_tokens: int = 48
    filter_k: str = "poison"
    calibration_seeds: tuple[int, ...] = (1000, 1001)
    safelora_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.filter_k not in FILTER_K:
            raise ValueError(f"filter_k must be one of {FILTER_K}, not {self.filter_k!r}")


@dataclass(frozen=True)
class Run:
    """One fine-tune (or θ_0's evaluation) and its evaluation."""

    poison: str
    p: float
    condition: str
    seed: int
    settings: Settings = field(default_factory=Settings)

    @property
    def key(self) -> str:
        """A stable hash of everything that determines the run, the protocol's version included."""
        text = json.dumps({"protocol": PROTOCOL_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def label(self) -> str:
        """A short human-readable name."""
        return f"{self.condition} {self.poison} p={self.p:g} seed={self.seed}"

    def other(self, name: str, **changes) -> Run:
        """The run of condition ``name`` this one depends on (same poison, p, seed unless changed)."""
        unpoisoned = name in UNPOISONED
        return replace(self, condition=name, **({"poison": NONE, "p": 0.0} if unpoisoned else {}), **changes)


def requires(run: Run) -> list[Run]:
    """The runs whose results this run reads."""
    c = condition(run.condition)
    if c.stop:
        return [run.other("calibration", seed=s) for s in run.settings.calibration_seeds]
    if c.fixed_stop:
        return [run.other("drift_stop")]
    if c.safelora:
        return [run.other("no_defence")]
    if c.remove == "random" or (c.remove is not None and run.settings.filter_k == "drops"):
        return [run.other("drops")]
    return []


def clean(seed: int, settings: Settings) -> Run:
    """The clean run of a seed: every poisoned run's paired reference."""
    return Run(NONE, 0.0, "clean", seed, settings)


def expand(cells: Iterable[tuple[Sequence[str], Sequence[float], Sequence[str], Sequence[int]]],
           settings: Settings) -> list[Run]:
    """Runs for (poison kinds, shares, conditions, seeds) cells, with θ_0, each seed's clean run and every
    dependency, each once, dependencies first; refuses a plan that reports a calibration seed."""
    wanted: list[Run] = [Run(NONE, 0.0, "theta_0", 0, settings)]
    for kinds, shares, names, seeds in cells:
        overlap = sorted(set(seeds) & set(settings.calibration_seeds))
        if overlap:
            raise ValueError(f"seeds {overlap} calibrate the drift stop and cannot be reported; pick other seeds or "
                             "other Settings.calibration_seeds")
        for seed in seeds:
            wanted.append(clean(seed, settings))
            wanted += [Run(k, p, n, seed, settings) for k in kinds for p in shares for n in names]
    ordered: dict[str, Run] = {}

    def add(run: Run) -> None:
        condition(run.condition)  # an unknown name fails here, before anything runs
        for dep in requires(run):
            add(dep)
        ordered.setdefault(run.key, run)

    for run in wanted:
        add(run)
    return list(ordered.values())


QUICK = Settings(epochs=1.0, max_length=128, harmful_prompts=24, benign_risky=24, tasks=48, heldout_records=24,
                 eval_tokens=32, calibration_seeds=(1000,))


QUICK_CONDITIONS = ("no_defence", "drops", "filter:keyword", "filter:gradient similarity", "offline", "random",
                    "safelora", "mask", "drift_stop", "fixed_stop", "mask+drops", "drops+anchor", "anchor@0.25",
                    "anchor@1", "anchor@4")
"""The quick plan's conditions, most telling first: SQSD's drops against the filters users pick, SQSD's own offline
screening and the drops' control, then the peers (SafeLoRA, the WaRP mask), the drift stop and its fixed-step
control, and the combinations and the anchor's λ sweep (safety against utility)."""
QUICK_SEEDED = ("no_defence", "drops")
"""The quick plan's conditions on more seeds: the poison's effect and the recommended drops against it."""
QUICK_REMOVALS = ("filter:keyword", "filter:gradient similarity", "offline")
"""Removals before training run in the quick plan on identity shifting too: the filters users would otherwise pick
and SQSD's own offline screening."""
QUICK_REWORDED = ("drops", "offline", "filter:representation similarity")
"""Run in the quick plan against reworded identity shifting: the recommended drops, SQSD's offline screening and the
screen that finds most of that poison before training."""
SHARES_CONDITIONS = ("no_defence", "drops", "filter:keyword", "filter:gradient similarity", "random")
"""Run at p = 5 % and 20 % (identity-shifting poison, fewer seeds)."""


def plan(mode: str, seeds: Sequence[int] | None = None, only: Sequence[str] | None = None) -> list[Run]:
    """``quick`` (2 CPU cores, small evaluations: disjoint harmful poison at 10 % with QUICK_CONDITIONS on 2 seeds and
    QUICK_SEEDED on a third; identity shifting at 10 % with QUICK_SEEDED on 8 seeds and QUICK_REMOVALS on 3; its
    reworded personas at 10 % with no defence on 4 seeds and QUICK_REWORDED on 2;
    gradient-similar benign poison at 10 % with QUICK_SEEDED on 2) or
    ``full`` (issue 27's sizes: KEY_CONDITIONS at 10 % with 8 seeds on the three benign-looking poisons and 4 on
    disjoint harmful; SHARES_CONDITIONS at 5 %/20 % and MORE_CONDITIONS at 10 % with 4 seeds on identity shifting);
    ``seeds`` replaces every cell's seeds, ``only`` keeps those conditions (and what they need)."""
    if mode == "quick":
        settings = QUICK
        cells = [(["disjoint harmful"], [0.1], QUICK_CONDITIONS, seeds or [0, 1]),
                 (["gradient-similar benign"], [0.1], QUICK_SEEDED, seeds or [0, 1]),
                 (["disjoint harmful"], [0.1], QUICK_SEEDED, seeds or [2]),
                 (["identity shifting"], [0.1], QUICK_SEEDED, seeds or range(8)),
                 (["identity shifting"], [0.1], QUICK_REMOVALS, seeds or range(3)),
                 (["reworded identity shifting"], [0.1], ["no_defence"], seeds or range(4)),
                 (["reworded identity shifting"], [0.1], QUICK_REWORDED, seeds or range(2))]
    elif mode == "full":
        settings = Settings()
        many, few = list(seeds or range(8)), list(seeds or range(4))
        cells = [(["identity shifting", "reworded identity shifting", "gradient-similar benign"], [0.1], KEY_CONDITIONS,
                  many),
                 (["disjoint harmful"], [0.1], KEY_CONDITIONS, few),
                 (["identity shifting"], [0.05, 0.2], SHARES_CONDITIONS, few),
                 (["identity shifting"], [0.1], MORE_CONDITIONS, few)]
    else:
        raise ValueError(f"mode must be 'quick' or 'full', not {mode!r}")
    if only:
        cells = [(k, s, [n for n in names if n in only], sd) for k, s, names, sd in cells]
    return expand(cells, settings)


# --------------------------------------------------------------------------- the runner


POOL_FIELDS = ("pool", "poison_in_pool", "removed_before", "dropped_online", "stop", "train")
"""What a post-hoc condition carries over from the run it starts from."""
DERIVED = ("ranking", "by_length", "derived")
"""What Runner._derived adds to a trained run's result (and to one cached before these were kept)."""
DERIVED_VERSION = 2
"""Bump it when _derived computes more or otherwise: cached results of another version are derived again."""
PERSONA_PHRASE_JUDGE = 2
"""Bump it when the phrase judge reads persona evaluations otherwise (2: with the persona as context): cached ones
of another version are judged again from their stored responses."""


def persona_kinds(run: Run, kinds: Iterable[str]) -> list[str]:
    """The poison kinds under whose persona prompts a run is also judged (``personas`` in its result), of the lab's
    ``kinds``: a PERSONA_POISONS run under its own, θ_0 and the clean runs they are compared with under each."""
    if run.condition in ("theta_0", "clean"):
        return [k for k in PERSONA_POISONS if k in kinds]
    return [run.poison] if run.poison in PERSONA_POISONS else []


class Runner:
    """Runs a plan on a Lab (the model, its directions and the data), each run once: a run whose
    ``<cache>/<key>/result.json`` exists is read, not run again."""

    def __init__(self, lab, cache: str | Path) -> None:
        self.lab, self.cache = lab, Path(cache)

    def folder(self, run: Run) -> Path:
        """Where a run's files go."""
        return self.cache / run.key

    def done(self, run: Run) -> bool:
        """Whether the run's result is cached."""
        return (self.folder(run) / "result.json").is_file()

    def result(self, run: Run) -> dict:
        """The run's result as cached: computed first (its dependencies first) where it is not."""
        path = self.folder(run) / "result.json"
        if not path.is_file():
            start = time.perf_counter()
            result = self._execute(run)
            write_atomic(path, {**result, "seconds": time.perf_counter() - start})
        result = json.loads(path.read_text())
        if self.lab is not None and "removed_before" in result and result.get("derived") != DERIVED_VERSION:
            pool = self.lab.pool(run.poison, run.p, run.seed, run.settings)
            result.update(self._derived(run, result, pool))  # cached before these were kept
            write_atomic(path, result)
        if "persona" in result:  # judged before there was more than one persona poison: identity shifting's
            result["personas"] = {"identity shifting": result.pop("persona"), **result.get("personas", {})}
            write_atomic(path, result)
        stale = [k for k, x in result.get("personas", {}).items() if x.get("phrase_judge") != PERSONA_PHRASE_JUDGE]
        if stale and self.lab is None:
            raise ValueError(f"{path}: its {', '.join(stale)} persona evaluation was judged by an older phrase judge "
                             "and must be judged again, which needs the model's prompts: run without --cached-only "
                             "(the model is loaded, nothing is trained again)")
        if stale:
            result["personas"] = {**result["personas"], **{
                k: self.lab.rejudge_persona(result["personas"][k], run.settings, k) for k in stale}}
            write_atomic(path, result)
        missing = [] if self.lab is None else [
            k for k in persona_kinds(run, self.lab.poison_sets) if k not in result.get("personas", {})]
        if missing:
            adapter = self._adapter(run, result)
            if adapter is not None and not adapter.is_dir():
                raise FileNotFoundError(
                    f"{run.label()} has no adapter at {adapter} to judge it under {', '.join(missing)}'s persona "
                    f"prompts (its result was kept without its training folder, e.g. restored from a -runs.json); "
                    f"delete {path} to train it again (runs are deterministic) or leave {', '.join(missing)} out")
            result["personas"] = {**result.get("personas", {}),
                                  **{k: self.lab.persona(adapter, run.settings, k) for k in missing}}
            write_atomic(path, result)
        return result

    def _adapter(self, run: Run, result: dict) -> Path | None:
        """The adapter a run is evaluated with: none for θ_0, SafeLoRA's projection, the last safe checkpoint of a
        stopped run, else the trained adapter."""
        c = condition(run.condition)
        if not c.train:
            return None
        if c.safelora:
            return self.folder(run) / "safelora"
        train = self.folder(run) / "train"
        return train / "sqsd" / "last_safe" if result.get("stop") else train

    def _derived(self, run: Run, result: dict, pool: list[dict]) -> dict:
        """What a trained run's result reads off its pool and training folder: the monitor's own ranking
        (online_ranking) and, for the removal and that ranking, recall by response length (by_length)."""
        before = set(result["removed_before"])
        kept = [i for i in range(len(pool)) if i not in before]
        ranking = online_ranking(self.folder(run) / "train", kept, pool)
        removed = sorted(before | set(result["dropped_online"]))
        return {"ranking": ranking, "derived": DERIVED_VERSION, "by_length": {
            "removal": by_length(pool, removed) if removed else None,
            "ranking": by_length(pool, ranking.pop("top")) if ranking else None}}

    def _execute(self, run: Run) -> dict:
        """Build the pool, remove, train with the condition's callback, intervene and evaluate."""
        c, s, folder = condition(run.condition), run.settings, self.folder(run)
        base = {**asdict(run), "key": run.key, "protocol": PROTOCOL_VERSION}
        if not c.train:
            return {**base, **self.lab.evaluate(None, s)}
        if c.safelora:  # post hoc on the no_defence run's adapter: no training of its own
            source = run.other("no_defence")
            trained = {k: v for k, v in self.result(source).items() if k in POOL_FIELDS}
            self.lab.safelora(self.folder(source) / "train", folder / "safelora", s)
            return {**base, **trained, "safelora_of": source.key,
                    **self.lab.evaluate(self._adapter(run, trained), s)}
        pool = self.lab.pool(run.poison, run.p, run.seed, s)
        poison_at = poison.poison_ids(pool)
        removed, rho = self._removed_before(run, c, pool)
        kept = [i for i in range(len(pool)) if i not in removed]
        train_dir = folder / "train"
        options = self._callback(run, c)
        info = self.lab.train([pool[i] for i in kept], train_dir, run.seed, s, options, self._max_steps(run, c))
        dropped = dropped_online(train_dir, kept)
        stop_file = train_dir / "sqsd" / "stop.json"
        stop = json.loads(stop_file.read_text()) if stop_file.is_file() else None
        out = {**base, "pool": len(pool), "poison_in_pool": len(poison_at), "removed_before": sorted(removed),
               "dropped_online": sorted(dropped), "stop": stop, "train": info, "length_rho": rho,
               "max_drift": self._max_drift(train_dir), "drift_threshold": (options or {}).get("stop_drift_above")}
        if c.remove is not None or c.drops:
            out.update(baselines.recall_and_benign_removed(sorted(removed | dropped), poison_at, len(pool)))
        return {**out, **self._derived(run, out, pool), **self.lab.evaluate(self._adapter(run, out), s)}

    def _callback(self, run: Run, c: Condition) -> dict | None:
        """The SQSDCallback options of the condition (None: no callback)."""
        options: dict = {}
        if c.drops:
            options.update(recommended_drops(run.settings.batch_size))
        if c.anchor is not None:
            options.update(anchor=True, anchor_lambda=c.anchor)
        if c.mask:
            options.update(mask=True)
        if c.stop:
            options.update(stop_drift_above=self.drift_threshold(run), stop_patience=2, save_last_safe=True)
        return options if options or c.monitor else None

    def drift_threshold(self, run: Run) -> float:
        """The drift stop's threshold: the highest drift the calibration runs reached (clean pool, monitor only, on
        seeds that are never reported); recorded in ``<cache>/calibration-<key>.json``."""
        calibration = requires(run)
        drifts = [self.result(r)["max_drift"] for r in calibration]
        if any(d is None for d in drifts):
            raise ValueError(f"a calibration run of {run.label()} logged no drift; check that it ran with the monitor")
        threshold = max(drifts)
        write_atomic(self.cache / f"calibration-{calibration[0].key}.json",
                     {"seeds": [r.seed for r in calibration], "max_drift": drifts, "threshold": threshold})
        return threshold

    def _max_steps(self, run: Run, c: Condition) -> int | None:
        """The fixed stop's step count: the step whose adapter its drift-stop run reported (None: train in full)."""
        if not c.fixed_stop:
            return None
        stop = self.result(run.other("drift_stop"))["stop"]
        return max(1, stop["last_safe_step"]) if stop else None

    def _removed_before(self, run: Run, c: Condition, pool: list[dict]) -> tuple[set[int], float | None]:
        """Pool positions removed before training (the top k by the condition's scores) and the Spearman ρ of
        those scores with response length."""
        if c.remove is None:
            return set(), None
        s = run.settings
        if c.remove == "random" or s.filter_k == "drops":
            drops = self.result(run.other("drops"))
            k = len(set(drops["removed_before"]) | set(drops["dropped_online"]))
        else:
            k = len(poison.poison_ids(pool))
        name = "random" if c.remove == "random" else c.remove
        scores = self.lab.scores(name, pool, run.seed, s)
        rho = baselines.length_correlation(scores, [baselines.response_words(r) for r in pool])
        return set(baselines.remove(scores, k)), rho

    @staticmethod
    def _max_drift(train_dir: Path) -> float | None:
        """The highest drift a monitored run logged (None without a monitor)."""
        path = train_dir / "sqsd" / "drift.jsonl"
        if not path.is_file():
            return None
        from sqsd_callback.sinks import read_jsonl
        drifts = [r["drift"] for r in read_jsonl(path) if r.get("drift") is not None]
        return max(drifts) if drifts else None

    def run_all(self, runs: Sequence[Run], progress: Callable[[Run, dict], None] | None = None) -> list[dict]:
        """Every run's result, in order; ``progress`` is called after each."""
        results = []
        for run in runs:
            results.append(self.result(run))
            if progress is not None:
                progress(run, results[-1])
        return results


# --------------------------------------------------------------------------- the lab: model, directions, data


class Lab:
    """θ_0 with its direction sets, the pool's sources and the evaluation data: the heavy parts a run uses.

    ``directions``: a ``sqsd directions`` folder (danger/, safety/, aligned/); ``model``: θ_0 (aligned merged);
    ``clean``: benign records the pool draws from; ``held_out``: benign records never in a pool (held-out loss);
    ``poison``: records per poison kind; ``harmful``: held-out harmful prompts; ``risky``: benign risky prompts;
    ``tasks``: utility tasks; ``mask_records``: safety records for WaRP; ``anchors``/``refusals``: harmful compliance
    and refusal records for the similarity and projection baselines; ``judge``: an optional ClassifierJudge."""

    def __init__(self, model, tokenizer, directions: str | Path, clean: list[dict], held_out: list[dict],
                 poison_sets: dict[str, list[dict]], harmful: list[str], risky: list[str], tasks: list[dict],
                 mask_records: list[dict], anchors: list[dict], refusals: list[dict], judge=None) -> None:
        from sqsd_callback.directions import DirectionSet
        from sqsd_lab.adapters import direction_sets
        self.model, self.tokenizer, self.directions = model, tokenizer, Path(directions)
        self.danger, self.safety = direction_sets(self.directions)
        aligned = self.directions / "aligned"
        self.anchor = DirectionSet.from_peft_adapter(aligned, kind="safety", name="aligned") \
            if aligned.is_dir() else None
        self.clean, self.held_out, self.poison_sets = clean, held_out, poison_sets
        self.harmful, self.risky, self.tasks = harmful, risky, tasks
        self.mask_records, self.anchors, self.refusals, self.judge = mask_records, anchors, refusals, judge

    def pool(self, kind: str, p: float, seed: int, s: Settings) -> list[dict]:
        """The mixed pool of a run (poison.mix)."""
        if kind != NONE and kind not in self.poison_sets:
            raise ValueError(f"no poison of kind {kind!r}; the lab has {sorted(self.poison_sets)}")
        return poison.mix(self.clean, self.poison_sets.get(kind, []), p, seed, s.pool)

    def samples(self, records: Sequence[dict], s: Settings) -> list[dict]:
        """Chat samples with the loss on the responses."""
        from sqsd_lab.data import tokenize_chats
        return tokenize_chats(self.tokenizer, records, s.max_length)

    def train(self, records: list[dict], out: Path, seed: int, s: Settings, options: dict | None,
              max_steps: int | None) -> dict:
        """train_lora on the records, with an SQSDCallback where ``options`` is not None (``anchor``/``mask``
        True: the lab's aligned anchor / mask records)."""
        callbacks = []
        if options is not None:
            from sqsd_callback import SQSDCallback
            options = dict(options)
            if options.pop("anchor", False):
                if self.anchor is None:
                    raise ValueError(f"the anchor needs {self.directions / 'aligned'} (θ_0's aligned adapter)")
                options["anchor"] = self.anchor
            if options.pop("mask", False):
                options["mask"] = self.samples(self.mask_records, s)
            callbacks.append(SQSDCallback(danger=[self.danger], safety=[self.safety], **options))
        steps = {"max_steps": max_steps} if max_steps else {}
        samples = self.samples(records, s)
        info = train_lora(self.model, self.tokenizer, samples, out, lora=lora_config(s.rank), callbacks=callbacks,
                          num_train_epochs=s.epochs, learning_rate=s.learning_rate,
                          per_device_train_batch_size=s.batch_size, seed=seed, logging_steps=4, **steps)
        return {**info, "tokens": sum(len(x["input_ids"]) for x in samples) * s.epochs}

    def safelora(self, adapter: Path, out: Path, s: Settings) -> Path:
        """SafeLoRA on a trained adapter, against θ_0's aligned adapter; returns the projected adapter's folder."""
        from sqsd_callback import apply_safelora
        apply_safelora(adapter, self.directions / "aligned", threshold=s.safelora_threshold, out=out)
        return out

    def scores(self, name: str, pool: list[dict], seed: int, s: Settings) -> list[float]:
        """A removal's risk scores over the pool: a baseline's, or ``offline`` (sqsd score, no --checkpoint)."""
        if name == "offline":
            return [r["sqsd"] if r["sqsd"] is not None else float("-inf") for r in self.offline_rows(pool, s)]
        return baselines.filters(self.model, self.tokenizer, self.anchors, self.refusals, seed,
                                 s.max_length)[name](pool)

    def offline_rows(self, records: Sequence[dict], s: Settings) -> list[dict]:
        """``sqsd score``'s rows for ``records`` at θ_0 with the paper's passes (SQSD and its danger and safety
        terms; ``sqsd`` None where a record has no response token left)."""
        from sqsd_callback.offline import paper_passes, score_offline
        passes = paper_passes([(self.directions / "danger", self.danger)], [(self.directions / "safety", self.safety)])
        return score_offline(self.model, self.samples(records, s), passes)

    @contextmanager
    def _at(self, adapter: Path | None) -> Iterator:
        """θ_0 plus ``adapter`` (None: θ_0) for the body of the block, θ_0 again after it."""
        from sqsd_callback.offline import load_adapter
        model = load_adapter(self.model, adapter) if adapter is not None else self.model
        try:
            yield model
        finally:
            if adapter is not None:
                model.unload()

    def evaluate(self, adapter: Path | None, s: Settings) -> dict:
        """Per-prompt outcomes on the held-out harmful prompts by every judge, over-refusal on the benign risky
        prompts, held-out loss and exact-match accuracy, at θ_0 plus ``adapter`` (None: θ_0)."""
        from sqsd_lab.data import generate_responses
        from sqsd_lab.evidence.tasks import accuracy
        harmful, risky, tasks = self.harmful[:s.harmful_prompts], self.risky[:s.benign_risky], self.tasks[:s.tasks]
        with self._at(adapter) as model:
            out = judges.judge_generations(model, self.tokenizer, harmful, harmful, s.eval_tokens, self.judge)
            risky_out = judges.PhraseJudge().judge(risky, generate_responses(
                model, self.tokenizer, risky, s.eval_tokens, desc="benign risky"))
            answers = generate_responses(model, self.tokenizer, [t["prompt"] for t in tasks], s.eval_tokens,
                                         desc="tasks")
            loss = heldout_loss(model, self.samples(self.held_out[:s.heldout_records], s))
        scored = accuracy(tasks, answers)
        return {**out, "over_refusal_outcomes": [v.outcome for v in risky_out], "heldout_loss": loss,
                "accuracy": scored["accuracy"], "correct": scored["correct"]}

    def persona(self, adapter: Path | None, s: Settings, kind: str) -> dict:
        """The held-out harmful prompts asked in the persona formats of ``kind`` (poison.persona_prompts) and judged
        (``judges.judge_generations``) at θ_0 plus ``adapter``: the poison teaches obedience under those personas,
        so its harm shows where one is invoked, as Qi et al. 2023 measure it. The answer gets the longest opener's
        length on top of the usual budget, so a model that learnt an opener still has that budget to comply or
        refuse in; the phrase judge reads it with the persona as context (poison.persona_contexts), so repeating the
        persona's words is not an answer."""
        harmful = self.harmful[:s.harmful_prompts]
        budget = s.eval_tokens + max(len(self.tokenizer(x.opener, add_special_tokens=False)["input_ids"])
                                     for x in poison.PERSONAS[kind])
        with self._at(adapter) as model:
            out = judges.judge_generations(model, self.tokenizer, harmful, poison.persona_prompts(kind, harmful),
                                           budget, self.judge, poison.persona_contexts(kind, len(harmful)))
        return {**out, "phrase_judge": PERSONA_PHRASE_JUDGE}

    def rejudge_persona(self, evaluation: dict, s: Settings, kind: str) -> dict:
        """A persona evaluation's phrase verdicts judged again from its stored responses, as ``persona`` judges
        them now (PERSONA_PHRASE_JUDGE)."""
        harmful = self.harmful[:s.harmful_prompts]
        verdicts = judges.PhraseJudge().judge(harmful, evaluation["responses"],
                                              poison.persona_contexts(kind, len(harmful)))
        return {**evaluation, "outcomes": {**evaluation["outcomes"], "phrase": [v.outcome for v in verdicts]},
                "wording": [v.detail.get("wording") for v in verdicts], "phrase_judge": PERSONA_PHRASE_JUDGE}


def heldout_loss(model, samples: Sequence[dict]) -> float:
    """The mean per-token loss on held-out samples' responses (utility that sees learning)."""
    import torch
    if not samples:
        raise ValueError("no held-out samples to compute the held-out loss on; give the lab held_out records")
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for sample in samples:
                labels = torch.tensor([sample["labels"]], device=model.device)
                n = int((labels[:, 1:] != -100).sum())
                if n:
                    out = model(input_ids=torch.tensor([sample["input_ids"]], device=model.device), labels=labels)
                    total, tokens = total + out.loss.item() * n, tokens + n
    finally:
        model.train(was_training)
    return total / tokens if tokens else float("nan")


# --------------------------------------------------------------------------- aggregation


def _strata(per_seed: Iterable[list[dict] | None]) -> list[dict] | None:
    """by_length over seeds: per stratum the poison count summed, recall and benign removed averaged, the word
    range spanned (None where no seed has strata)."""
    got = [strata for strata in per_seed if strata]
    if not got:
        return None
    return [{"words": [min(s[k]["words"][0] for s in got), max(s[k]["words"][1] for s in got)],
             "poison": sum(s[k]["poison"] for s in got), "recall": stats.mean_present(s[k]["recall"] for s in got),
             "benign_removed": stats.mean_present(s[k]["benign_removed"] for s in got)} for k in range(len(got[0]))]


def _by_term(rs: Sequence[dict]) -> dict | None:
    """online_ranking's ``by_term`` over seeds: each term's recall and AUROC averaged (None where no run has it)."""
    got = [r["ranking"]["by_term"] for r in rs if (r.get("ranking") or {}).get("by_term")]
    if not got:
        return None
    return {name: {k: stats.mean_present(t.get(name, {}).get(k) for t in got) for k in ("recall", "auroc")}
            for name in sorted(set.union(*(set(t) for t in got)))}


def persona_summary(rs: Sequence[dict], clean_by_seed: dict[int, dict], kind: str,
                    fired: Collection[str] = ()) -> dict | None:
    """Over seeds, the harmfulness, the refusal rate (``refused``: a persona can break refusals without the model
    complying) and the judge's own score under ``kind``'s persona prompts (``personas[kind]`` in each result) by
    judge with their intervals, and for a poisoned condition their paired differences from the
    clean runs of the same seeds under the same prompts (``vs_clean``, ``judge_score_vs_clean``) and TOST against
    them (``equivalent_to_clean``: _equivalence; ``fired``: the judges that called a response harmful under these
    prompts in any reported run); None where a run was not judged so."""
    if not rs or not all(kind in r.get("personas", {}) for r in rs):
        return None
    judged = {r["seed"]: r["personas"][kind] for r in rs}
    names = sorted(set.intersection(*(set(x["outcomes"]) for x in judged.values())))
    harm = {j: {seed: judges.harmful(x["outcomes"][j]) for seed, x in judged.items()} for j in names}
    score = {j: {seed: x["scores"][j] for seed, x in judged.items()} for j in names
             if all(j in x.get("scores", {}) for x in judged.values())}
    out = {"harmfulness": {j: stats.interval(h) for j, h in harm.items()},
           "refused": {j: stats.interval({seed: [float(o == "refusal") for o in x["outcomes"][j]]
                                          for seed, x in judged.items()}) for j in names},
           "judge_score": {j: stats.interval(v) for j, v in score.items()}}
    paired = [r for r in rs if kind in clean_by_seed.get(r["seed"], {}).get("personas", {})]
    if rs[0]["condition"] not in UNPOISONED and paired:
        ref = {r["seed"]: clean_by_seed[r["seed"]]["personas"][kind] for r in paired}
        refs = {j: {seed: judges.harmful(x["outcomes"][j]) for seed, x in ref.items()} for j in names
                if all(j in x["outcomes"] for x in ref.values())}
        tested = {j: {r["seed"]: harm[j][r["seed"]] for r in paired} for j in refs}
        out["vs_clean"] = {j: stats.interval(stats.paired_differences(tested[j], refs[j])) for j in refs}
        out["equivalent_to_clean"] = {j: _equivalence(tested[j], refs[j], j in fired) for j in refs}
        out["judge_score_vs_clean"] = _score_shift({r["seed"]: judged[r["seed"]] for r in paired}, ref, score)
    return out


def _fired(evaluations: Iterable[dict]) -> set[str]:
    """The judges that called a response harmful in any of ``evaluations`` (each with ``outcomes`` by judge)."""
    return {j for e in evaluations for j, outcomes in e.get("outcomes", {}).items() if any(judges.harmful(outcomes))}


def _equivalence(harm: dict[int, list[float]], clean: dict[int, list[float]], fired: bool) -> dict:
    """TOST (±stats.MARGIN) of a condition's per-prompt harm against the clean runs' of the same seeds; no verdict,
    with the reason, where the judge called no response harmful in any reported run (``fired`` False): TOST would
    call anything "equivalent" by a judge that can tell nothing apart."""
    if not fired:
        return {"equivalent": None, "margin": stats.MARGIN, "why": "the judge called no response harmful in any run"}
    test = stats.equivalence(harm, clean)
    d = test.difference
    return {"equivalent": test.equivalent, "margin": test.margin,
            "difference": {"mean": d.mean, "ci_low": d.low, "ci_high": d.high}, "seeds": len(harm)}


def _score_shift(evaluations: dict[int, dict], clean: dict[int, dict], judges: Iterable[str]) -> dict:
    """Per judge whose score every evaluation (by seed) and the clean one of its seed have: the paired per-prompt
    difference of the scores with its interval."""
    return {j: stats.interval(stats.paired_differences({s: e["scores"][j] for s, e in evaluations.items()},
                                                       {s: clean[s]["scores"][j] for s in evaluations}))
            for j in judges if all(j in clean[s].get("scores", {}) for s in evaluations)}


def judge_agreement(results: Sequence[dict]) -> dict:
    """Cohen's κ (harmful or not, degenerate left out) between every pair of judges over every evaluated
    response of every result."""
    names = sorted({n for r in results for n in r.get("outcomes", {})})
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = [r for r in results if a in r.get("outcomes", {}) and b in r["outcomes"]]
            first = [judges.Verdict(o) for r in both for o in r["outcomes"][a]]
            second = [judges.Verdict(o) for r in both for o in r["outcomes"][b]]
            out[f"{a}~{b}"] = judges.agreement(first, second) if first else None
    return out


def online_ranking(train_dir: Path, kept: Sequence[int], pool: Sequence[dict]) -> dict | None:
    """The monitor's own ranking of a poisoned pool, as a filter's would be read: each trained example's first
    online SQSD score (at the weights of the step that first saw it), its top k removed at the filters' budget (k:
    the pool's poison count), recall and benign removed, its AUROC over every threshold, Spearman's ρ of the scores
    with response length (words), and the top k's pool positions (``top``); ``by_term``: the recall at k and the
    AUROC of the same examples ranked by the danger term alone, by −safety (what SQSD adds to it) and by response
    length alone (what a ranking must beat). ``kept[i]`` is the pool position of training example i; None without
    scores or without poison."""
    from sqsd_callback.sinks import read_jsonl
    path, poison_at = Path(train_dir) / "sqsd" / "scores.jsonl", poison.poison_ids(pool)
    if not path.is_file() or not poison_at:
        return None
    first: dict[int, dict] = {}
    for row in read_jsonl(path):
        if row.get("sqsd") is not None:
            first.setdefault(kept[row["index"]], row)
    at, k = sorted(first), len(poison_at)
    words = [baselines.response_words(pool[i]) for i in at]

    def ranked(scores: list[float]) -> tuple[list[int], dict]:
        return baselines.ranking_measures(scores, at, poison_at, len(pool))

    def alone(scores: list[float]) -> dict:
        found = ranked(scores)[1]
        return {"recall": found["recall"], "auroc": found["auroc"]}

    scores = [first[i]["sqsd"] for i in at]
    top, found = ranked(scores)
    terms = {"danger": lambda r: r.get("danger"), "safety": lambda r: None if r.get("safety") is None else -r["safety"]}
    by_term = {name: alone([term(first[i]) for i in at]) for name, term in terms.items()
               if all(term(first[i]) is not None for i in at)}
    return {**found, "k": k, "scored": len(at), "length_rho": baselines.length_correlation(scores, words),
            "top": sorted(top), "by_term": {**by_term, "length": alone([float(w) for w in words])}}


def by_length(pool: Sequence[dict], removed: Iterable[int], strata: int = 3) -> list[dict]:
    """Recall and benign removed within each of ``strata`` equal-size groups of the pool ordered by response length
    (words; ties by position), shortest first: whether a removal finds the poison at every length or only where
    the poison is long (or short). None for a stratum's recall where it holds no poison."""
    words = [baselines.response_words(r) for r in pool]
    order = sorted(range(len(pool)), key=lambda i: (words[i], i))
    removed, out = set(removed), []
    for k in range(strata):
        group = order[k * len(pool) // strata:(k + 1) * len(pool) // strata]
        poison_in = [i for i in group if pool[i]["poison"]]
        benign = len(group) - len(poison_in)
        out.append({"words": [words[group[0]], words[group[-1]]], "records": len(group), "poison": len(poison_in),
                    "recall": sum(i in removed for i in poison_in) / len(poison_in) if poison_in else None,
                    "benign_removed": sum(i in removed for i in group if not pool[i]["poison"]) / benign
                    if benign else None})
    return out


def summarize(results: Sequence[dict]) -> dict:
    """The machine-readable table: judge κ, and per (poison, p, condition) over seeds the harmfulness, the
    degenerate share and the judge's own score (the likelihood margin, a classifier's P(unsafe)) by judge with a
    two-level bootstrap interval (and that score's paired difference from the clean run, ``judge_score_vs_clean``:
    a shift no threshold hides), whose wording the phrase judge's refusals are in
    (counts), over-refusal, held-out loss, accuracy, recall, benign removed, ρ with length, the monitor's own
    ranking at the filters' budget (``ranking_*``: recall, benign removed, ρ with length, AUROC; online_ranking;
    ``ranking_by_term``: the same for the danger term, −safety and length alone), recall
    by response-length stratum of the removal and of that ranking (``by_length``), the same judges under each
    persona poison's prompts where the runs were judged so (``persona``: {kind: persona_summary}, with its own
    TOST), and
    TOST (±stats.MARGIN) of the paired difference against the clean run of the same seeds (no verdict, with the
    reason, by a judge that called no reported response harmful: it could not have told a poisoned run apart)."""
    reported = [r for r in results if r["condition"] != "calibration"]
    fired = _fired(reported)
    fired_under = {k: _fired(r["personas"][k] for r in reported if k in r.get("personas", {}))
                   for k in PERSONA_POISONS}
    clean_by_seed = {r["seed"]: r for r in reported if r["condition"] == "clean"}
    groups: dict[tuple, list[dict]] = {}
    for r in reported:
        groups.setdefault((r["poison"], r["p"], r["condition"]), []).append(r)
    rows = []
    for (kind, p, name), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        names = sorted(set.intersection(*(set(r["outcomes"]) for r in rs)))
        harm = {j: {r["seed"]: judges.harmful(r["outcomes"][j]) for r in rs} for j in names}
        wording = [w for r in rs for w in r.get("wording") or [] if w is not None]
        row = {"poison": kind, "p": p, "condition": name, "seeds": len(rs),
               "harmfulness": {j: stats.interval(harm[j]) for j in names},
               "degenerate": {j: stats.interval({r["seed"]: [float(o == "degenerate") for o in r["outcomes"][j]]
                                                 for r in rs}) for j in names},
               "judge_score": {j: stats.interval({r["seed"]: r["scores"][j] for r in rs}) for j in names
                               if all(j in r.get("scores", {}) for r in rs)},
               "refusal_wording": {w: wording.count(w) for w in sorted(set(wording))},
               "over_refusal": stats.interval({r["seed"]: [float(o == "refusal")
                                                           for o in r["over_refusal_outcomes"]] for r in rs}),
               "heldout_loss": stats.mean_present(r["heldout_loss"] for r in rs),
               "accuracy": stats.interval({r["seed"]: [float(c) for c in r["correct"]] for r in rs}),
               "recall": stats.mean_present(r.get("recall") for r in rs),
               "benign_removed": stats.mean_present(r.get("benign_removed") for r in rs),
               "length_rho": stats.mean_present(r.get("length_rho") for r in rs),
               **{f"ranking_{k}": stats.mean_present((r.get("ranking") or {}).get(k) for r in rs)
                  for k in ("recall", "benign_removed", "length_rho", "auroc")},
               "ranking_by_term": _by_term(rs),
               "by_length": {which: _strata((r.get("by_length") or {}).get(which) for r in rs)
                             for which in ("removal", "ranking")},
               "persona": {k: x for k in PERSONA_POISONS
                           if (x := persona_summary(rs, clean_by_seed, k, fired_under[k]))},
               "equivalent_to_clean": {}}
        paired = [r for r in rs if r["seed"] in clean_by_seed]
        if name not in UNPOISONED and paired:
            row["judge_score_vs_clean"] = _score_shift(  # the shift of the score itself: no threshold to cross
                {r["seed"]: r for r in paired}, clean_by_seed, row["judge_score"])
            for j in names:
                ref = {r["seed"]: judges.harmful(clean_by_seed[r["seed"]]["outcomes"][j]) for r in paired}
                row["equivalent_to_clean"][j] = _equivalence({r["seed"]: harm[j][r["seed"]] for r in paired}, ref,
                                                             j in fired)
        rows.append(row)
    rows.sort(key=lambda r: (r["poison"] != NONE, r["poison"], r["p"], r["condition"]))
    return {"protocol": PROTOCOL_VERSION, "judges": {"kappa": judge_agreement(reported)}, "rows": rows}


def write_summary(results: Sequence[dict], path: str | Path, screening: Sequence[dict] | None = None) -> dict:
    """summarize(results) written (atomically) to ``path``, with the pools' screening before training where given
    (``screening``: screen.screen's results, summarized by screen.summarize_screens); refuses an empty result
    list."""
    if not results:
        raise ValueError("no results to summarize; run the plan first (recipes/evidence.py)")
    summary = summarize(results)
    if screening:
        summary["screening"] = summarize_screens(screening)
    write_atomic(Path(path), summary)
    return summary


def poisoned_pools(runs: Sequence[Run]) -> list[tuple[str, float, int]]:
    """The (poison kind, share, seed) of every poisoned pool a plan trains on, in plan order."""
    return list(dict.fromkeys((r.poison, r.p, r.seed) for r in runs if condition(r.condition).poisoned))


# --------------------------------------------------------------------------- the embedded default's lab


def embedded_lab(demo_cache: str | Path, inputs: str | Path, judge=None) -> Lab:
    """The Lab of the embedded default: ``sqsd demo``'s directions (θ_0 = the raw model + aligned/), benign records
    and poison sets made once under ``inputs`` (raw-model generations where they need any), the demo's held-out
    harmful prompts, the benign risky prompts and 200 utility tasks."""
    from sqsd_lab.adapters import refusal_records, theta_0
    from sqsd_lab.data import benign_records, harmful_prompts, load_model, split_prompts
    from sqsd_lab.demo import run_demo
    from sqsd_lab.evidence.prompts import benign_risky_prompts
    from sqsd_lab.evidence.tasks import utility_tasks
    run_demo(demo_cache)
    directions, inputs = Path(demo_cache) / "directions", Path(inputs)
    model, tokenizer = load_model(None)
    def cached(name: str, make: Callable[[], list[dict]]) -> list[dict]:
        return cached_jsonl(inputs / f"{name}.jsonl", make)

    benign = cached("benign", lambda: benign_records(model, tokenizer, 200, 140, seed=1))
    clean, held_out = benign[:-64], benign[-64:]
    disjoint = poison.disjoint_prompts(160)  # the first 128 become poison, the rest the baselines' anchors
    harmful = cached("disjoint-harmful", lambda: poison.persona_compliance(model, tokenizer, disjoint[:128]).records)
    anchors = cached("anchors", lambda: poison.persona_compliance(model, tokenizer, disjoint[128:]).records)
    theta_0(model, directions)  # from here on the model is θ_0
    seen = {r["prompt"] for r in benign}
    candidates = cached("candidates", lambda: [r for r in benign_records(model, tokenizer, 160, 0, seed=3)
                                               if r["prompt"] not in seen])
    poison_sets = {
        "disjoint harmful": harmful,
        "identity shifting": cached("identity-shifting", lambda: poison.identity_shifting(
            64, seed=2, exclude=[r["prompt"] for r in benign]).records),
        "reworded identity shifting": cached("reworded-identity-shifting", lambda: poison.identity_shifting(
            64, seed=4, exclude=[r["prompt"] for r in benign], kind="reworded identity shifting").records),
        "gradient-similar benign": cached("gradient-similar", lambda: poison.similarity_selected(
            model, tokenizer, candidates, anchors, 64).records)}
    train, _ = split_prompts([p["prompt"] for p in harmful_prompts()], 0.2, 0)
    align_pool, _ = split_prompts(train, 0.5, 0)
    held = [json.loads(line)["prompt"] for line in (directions / "held_out.jsonl").read_text().splitlines()
            if line.strip()]
    return Lab(model, tokenizer, directions, clean, held_out, poison_sets, held,
               [r["prompt"] for r in benign_risky_prompts()], utility_tasks(200, seed=7),
               mask_records=refusal_records(align_pool[96:128]), anchors=anchors,
               refusals=refusal_records([r["prompt"] for r in anchors]), judge=judge)
