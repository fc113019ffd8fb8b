"""Offline scoring: SQSD of every sample at a model's parameters, in length-grouped batches, and the paper's protocol
(DESIGN §1), which takes danger projections at a fine-tuning checkpoint θ_t (a LoRA adapter at its own scaling)
and safety projections at θ_0 + α·V_safety (the safety adapter with its scaling replaced by α): each pass loads one
adapter onto the base model, scores the sets it serves and takes the adapter off again.

``score_stream`` does the same for data too large to hold, in processes of a torch.distributed group, each batch's
rows appended to part files as they are scored so that a run started again goes on where it stopped."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .bank import DirectionBank
from .directions import DirectionSet
from .directions.hub import adapter_dir, adapter_shapes
from .engines import make_engine
from .layers import find_targets
from .naming import canonical_name
from .runtime.distributed import Processes
from .runtime.identity import token_hash
from .scoring import check_metric, combine, project, rows
from .types import collate

STREAM_CHUNK = 4096
"""Samples ``score_stream`` holds at a time: it forms length-grouped batches within each such chunk of the stream."""


def score_samples(
    model,
    samples,
    danger=(),
    safety=(),
    metric: str = "cosine",
    engine: str = "hooks",
    batch_size: int = 8,
    progress: bool = True,
    max_tokens: int | None = None,
    gradient_checkpointing: bool = False,
) -> list[dict]:
    """SQSD of every sample at the model's current parameters, one row per sample in input order.

    ``samples``: dicts with ``input_ids`` and ``labels`` (−100 = not scored), optional ``attention_mask`` and
    ``index`` (defaults to the sample's position); batches group samples of similar length, at most
    ``batch_size`` of them and, with ``max_tokens``, at most that many padded tokens (long examples go in smaller
    batches, so activation memory stays bounded; a longer example goes alone). With ``gradient_checkpointing`` each
    decoder layer's activations are recomputed in the backward pass instead of kept (``layers_checkpointed``): a
    batch then holds one layer's activations instead of every layer's, for one more forward pass. Each example is
    scored as the paper does, by its own mean-loss gradient at batch size 1, without dropout; the model's
    parameters, ``.grad`` and train/eval mode are left as found.
    """
    check_metric(metric)
    samples = list(samples)
    if not samples:
        raise ValueError("score_samples got no samples.")
    score = BatchScorer(model, danger, safety, metric, engine, gradient_checkpointing)
    out: list[dict] = [{} for _ in samples]
    batches = length_batches([len(s.get("input_ids", ())) for s in samples], batch_size, max_tokens)
    for positions in tqdm(batches, desc=f"sqsd score ({engine})", disable=not progress or len(batches) < 2):
        index = [samples[i].get("index", i) for i in positions]
        for i, row in zip(positions, score([samples[i] for i in positions], index)):
            out[i] = row
    return out


class BatchScorer:
    """Scores batches of samples at a model's current parameters, with its direction bank and engine built once."""

    def __init__(self, model, danger: Sequence[DirectionSet] = (), safety: Sequence[DirectionSet] = (),
                 metric: str = "cosine", engine: str = "hooks", gradient_checkpointing: bool = False) -> None:
        targets = find_targets(model)
        self.device = next(iter(targets.values())).params[0].device
        self.bank = DirectionBank([*danger, *safety], {m: t.shape for m, t in targets.items()}).to(self.device)
        self.engine = make_engine(engine, targets, self.bank, model=model)
        self.model, self.metric, self.layers_recomputed = model, metric, gradient_checkpointing
        if gradient_checkpointing and not decoder_layers(model):
            raise ValueError(f"gradient_checkpointing=True recomputes each decoder layer in the backward pass, but "
                             f"{_model_name(model)} has no layer transformers marks as one (a "
                             f"GradientCheckpointingLayer or a class in _no_split_modules); score without it.")

    def __call__(self, samples: list[dict], index: list) -> list[dict]:
        """score_samples' rows of one batch of ``samples``, whose indices are ``index``."""
        batch = collate(samples)
        batch.index = index
        with layers_checkpointed(self.model) if self.layers_recomputed else nullcontext():
            stats = self.engine.compute(self.model, batch.to(self.device))
        return rows(project(stats, self.bank, self.metric), self.bank, batch.n_scored, batch.index)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, outermost only: transformers' GradientCheckpointingLayer instances, or the classes
    its ``_no_split_modules`` name (models of transformers versions before that class)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        GradientCheckpointingLayer = ()  # noqa: N806
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    found: list[tuple[str, torch.nn.Module]] = []
    for name, m in model.named_modules():
        if (isinstance(m, GradientCheckpointingLayer) or type(m).__name__ in names) and \
                not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, m))
    return [m for _, m in found]


@contextmanager
def layers_checkpointed(model: torch.nn.Module) -> Iterator[None]:
    """Within: each decoder layer runs under non-reentrant activation checkpointing, in eval mode too (where
    transformers' own checkpointing is off): its inputs are kept, its activations freed after the forward and
    recomputed, identically, when the backward pass reaches it. Each layer's own ``forward`` attribute (an
    accelerate hook's, say) is wrapped and put back on exit."""
    from torch.utils.checkpoint import checkpoint
    layers = decoder_layers(model)
    own = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def length_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Positions grouped by length (little padding): at most ``batch_size`` per batch and, with ``max_tokens``, at
    most that many padded tokens (batch size × its longest example); an example longer than ``max_tokens`` alone."""
    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"batch_size and max_tokens must be positive, got {batch_size} and {max_tokens}")
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        last = batches[-1] if batches else None
        fits = last is not None and len(last) < batch_size and (
            max_tokens is None or (len(last) + 1) * lengths[i] <= max_tokens)  # i is the longest so far
        if fits:
            last.append(i)
        else:
            batches.append([i])
    return batches


def load_adapter(model, name_or_path: str | Path, scaling: float | None = None):
    """``model`` with a saved LoRA adapter on top (a PeftModel; ``.unload()`` takes it off); ``scaling`` replaces the
    adapter's own alpha/r factor, as the paper loads θ_0 + α·V_safety."""
    from peft import PeftModel
    path = adapter_dir(name_or_path)
    check_adapter_fits(model, path)
    try:
        peft_model = PeftModel.from_pretrained(model, str(path))
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"adapter {path} does not fit the model {_model_name(model)}: {err}") from err
    if scaling is not None:
        for module in peft_model.modules():
            if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
                module.scaling["default"] = scaling
    return peft_model


def check_adapter_fits(model, path: str | Path) -> None:
    """Refuse, before PEFT loads it, a LoRA adapter whose updates have other shapes than the model's modules of the
    same names (an adapter made for another model size), naming one such module with both shapes."""
    have, want = adapter_shapes(path), _module_shapes(model)
    wrong = [(m, shape, want[m]) for m, shape in have.items() if m in want and want[m] != shape]
    if not wrong:
        return
    m, (a_out, a_in), (m_out, m_in) = wrong[0]
    config = Path(path) / "adapter_config.json"
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    raise ValueError(
        f"adapter {path} does not fit the model {_model_name(model)}: {len(wrong)} of its {len(have)} LoRA modules "
        f"have another shape, e.g. {m}: {a_out}×{a_in} (out×in) in the adapter, {m_out}×{m_in} in the model. The "
        f"adapter was made for another model{f' ({base!r}, its adapter_config.json says)' if base else ''}; build "
        f"directions for this model with `sqsd directions --model ...` or pass the model the adapter was trained on.")


def _module_shapes(model) -> dict[str, tuple[int, int]]:
    """out×in of every Linear-like module (nn.Linear, 4-bit and LoRA layers: in/out_features) and GPT-2 Conv1D, by
    the base model's module name."""
    shapes = {}
    for name, module in model.named_modules():
        n_in, n_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if isinstance(n_in, int) and isinstance(n_out, int):
            shapes[canonical_name(name)] = (n_out, n_in)
        elif isinstance(getattr(module, "nf", None), int) and getattr(module, "weight", None) is not None:
            shapes[canonical_name(name)] = (module.nf, module.weight.shape[0])  # Conv1D stores in×out
    return shapes


def _model_name(model) -> str:
    """The model's class and where it was loaded from."""
    where = getattr(getattr(model, "config", None), "name_or_path", "")
    return f"{type(model).__name__} ({where})" if where else type(model).__name__


@contextmanager
def covered_weights_trainable(model, sets: Sequence[DirectionSet]) -> Iterator:
    """``model`` with exactly the weights ``sets`` have directions for trainable, ``requires_grad`` restored on exit:
    an adapter-free pass then scores each example's full gradient on those modules, as a full fine-tune of them would
    take it (a merged θ_0 leaves every weight frozen; the output layer and embeddings stay out either way)."""
    covered = {m for s in sets for m in s.modules}
    was = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.nn.Parameter) and canonical_name(name) in covered:
                weight.requires_grad_(True)
        yield model
    finally:
        for p, flag in was.items():
            p.requires_grad_(flag)


@dataclass
class ScoringPass:
    """Score ``sets`` at base + ``adapter`` (its own scaling, or ``scaling`` in its place); with no adapter, at
    the model's own parameters (the weights the sets cover are then the scored targets, as in full fine-tuning)."""

    adapter: str | Path | None
    sets: list[DirectionSet]
    scaling: float | None = None

    @property
    def keys(self) -> list[str]:
        """Its sets' row keys, ``kind/name``."""
        return [f"{s.kind}/{s.name}" for s in self.sets]

    def by_kind(self) -> tuple[list[DirectionSet], list[DirectionSet]]:
        """(its danger sets, its safety sets)."""
        return [s for s in self.sets if s.kind == "danger"], [s for s in self.sets if s.kind == "safety"]

    def describe(self) -> dict:
        return {"adapter": None if self.adapter is None else str(self.adapter),
                "scaling": self.scaling or "adapter's own", "sets": self.keys}

    @contextmanager
    def applied(self, model) -> Iterator:
        """``model`` at the pass's parameters: with its adapter loaded (taken off again on exit); without one, with
        the weights the sets cover trainable."""
        if self.adapter is None:
            with covered_weights_trainable(model, self.sets):
                yield model
            return
        scored = load_adapter(model, self.adapter, self.scaling)
        try:
            yield scored
        finally:
            scored.unload()


def paper_passes(danger: Sequence[tuple[str | Path, DirectionSet]], safety: Sequence[tuple[str | Path, DirectionSet]],
                 checkpoint: str | Path | None = None, alpha: float = 0.5) -> list[ScoringPass]:
    """The paper's initialisations for (adapter, set) pairs: danger sets at the checkpoint θ_t (without one, each at
    θ_0 + α·its own adapter), safety sets each at θ_0 + α·its own adapter."""
    passes = [ScoringPass(checkpoint, [s for _, s in danger])] if checkpoint is not None and danger else \
        [ScoringPass(path, [s], alpha) for path, s in danger]
    return passes + [ScoringPass(path, [s], alpha) for path, s in safety]


def score_offline(model, samples: Sequence[dict], passes: Sequence[ScoringPass], metric: str = "cosine",
                  batch_size: int = 8, max_tokens: int | None = None,
                  gradient_checkpointing: bool = False) -> list[dict]:
    """One row per sample: every set's projection at its pass's parameters, the per-kind means and SQSD (None for a
    sample without scored tokens); ``model`` (the base, θ_0) is left as found. ``gradient_checkpointing`` as in
    score_samples."""
    kinds = _set_kinds(passes)
    values: list[dict] = [{} for _ in samples]
    for p in passes:
        with p.applied(model) as scored:
            rows = score_samples(scored, samples, *p.by_kind(), metric=metric, engine="hooks", batch_size=batch_size,
                                 max_tokens=max_tokens, gradient_checkpointing=gradient_checkpointing)
        for value, row in zip(values, rows):
            value.update({k: row[k] for k in p.keys})
    return [_offline_row(sample.get("index"), value, kinds) for sample, value in zip(samples, values)]


def _set_kinds(passes: Sequence[ScoringPass]) -> dict[str, str]:
    """Every pass's set keys and their kinds, refusing a name used twice for one kind."""
    keys = [k for p in passes for k in p.keys]
    kinds = {f"{s.kind}/{s.name}": s.kind for p in passes for s in p.sets}
    if len(kinds) != len(keys):
        raise ValueError(f"direction set names must be unique per kind (name them with NAME=ADAPTER); got {keys}")
    return kinds


def _offline_row(index, values: dict[str, float | None], kinds: dict[str, str]) -> dict:
    """score_offline's row of one sample from its sets' values: the per-kind means and SQSD, None without scored
    tokens."""
    row = {"index": index, "danger": None, "safety": None, "sqsd": None}
    if all(v is not None for v in values.values()):
        row.update(combine(list(values.values()), [kinds[k] for k in values]))
    return {**row, **values}


def score_stream(model, samples: Iterable[dict], passes: Sequence[ScoringPass], folder: str | Path,
                 metric: str = "cosine", batch_size: int = 8, max_tokens: int | None = None,
                 total: int | None = None, progress: bool = True,
                 gradient_checkpointing: bool = False) -> list[dict]:
    """score_offline's rows for data too large to hold, split over the processes of a torch.distributed group (if
    one is initialised) and resumable; returned on rank 0, in index order, once every rank has finished ([] on the
    others).

    ``samples`` is read once per pass (a list, or an iterable that starts over each time: not a generator),
    ``STREAM_CHUNK`` at a time; batches are formed by length within each chunk whatever the number of processes,
    and rank r scores batches r, r + world, .... Each sample needs a unique int ``index`` (default: its position);
    its optional ``extra`` (a JSON-able dict) is kept with its row and merged into it. Every batch's rows are
    appended to ``PartFiles`` under ``folder`` as they are scored; a run started again over the same folder skips
    the examples they hold, after checking each against the sample's tokens (a changed example is refused), in any
    number of processes and with any batch sizes. ``total`` (the number of samples if known, or a bound such as the
    number of records) gives rank 0's progress bar, one per pass, its time left; ``gradient_checkpointing`` as in
    score_samples."""
    check_metric(metric)
    if iter(samples) is samples:
        raise ValueError("score_stream reads the samples once per pass: give a list or an iterable that starts over "
                         "each time it is iterated, not a generator")
    kinds = _set_kinds(passes)
    procs = Processes.current()
    parts = PartFiles(folder, procs.rank)
    for k in range(len(passes)):
        total = _score_pass(model, samples, passes, k, parts, procs, metric, batch_size, max_tokens, total,
                            progress and procs.rank == 0, gradient_checkpointing)
    if procs.world > 1:
        dist.barrier()
    return parts.merged(passes, kinds) if procs.rank == 0 else []


def _score_pass(model, samples: Iterable[dict], passes: Sequence[ScoringPass], k: int, parts: PartFiles,
                procs: Processes, metric: str, batch_size: int, max_tokens: int | None, total: int | None,
                progress: bool, gradient_checkpointing: bool) -> int:
    """Pass ``k`` of score_stream: this rank's batches of the examples the part files lack, each batch's rows
    appended as it is scored (the samples' ``extra`` with the first pass's); the number of samples in the stream.
    The progress bar counts examples scored, those of an earlier run included, out of ``total``."""
    p = passes[k]
    done = {r["index"]: r["tokens"] for r in parts.rows(k)}
    bar = tqdm(total=total, initial=len(done), unit="example", disable=not progress,
               desc=f"sqsd score pass {k + 1}/{len(passes)} ({', '.join(p.keys)})")
    met = verified = batch = 0
    with p.applied(model) as scored, parts.appending(k) as append:
        score = BatchScorer(scored, *p.by_kind(), metric, gradient_checkpointing=gradient_checkpointing)
        for chunk in _chunks(samples, STREAM_CHUNK):
            index = [s.get("index", met + i) for i, s in enumerate(chunk)]
            tokens = [token_hash([*s.get("input_ids", ()), *s.get("labels", ())])[:8].hex() for s in chunk]
            for i, key in zip(index, tokens):
                if i in done:
                    if done[i] != key:
                        raise ValueError(f"example {i} is not the one the part files in {parts.folder} hold (its "
                                         f"tokens differ): the data, the tokenizer or the maximum length changed "
                                         f"since they were written. Start afresh in another folder, or after "
                                         f"deleting this one")
                    verified += 1
            met += len(chunk)
            for positions in length_batches([len(s.get("input_ids", ())) for s in chunk], batch_size, max_tokens):
                todo = [j for j in positions if index[j] not in done]
                if todo and batch % procs.world == procs.rank:
                    scored_rows = score([chunk[j] for j in todo], [index[j] for j in todo])
                    append([{"index": index[j], "tokens": tokens[j], **{key: row[key] for key in p.keys},
                             **({"extra": chunk[j]["extra"]} if k == 0 and "extra" in chunk[j] else {})}
                            for j, row in zip(todo, scored_rows)])
                batch += 1
                bar.update(len(todo))  # other ranks' batches counted as scored alongside this rank's
    bar.total = met
    bar.close()
    if verified != len(done):
        raise ValueError(f"the part files in {parts.folder} hold {len(done) - verified} examples the data no "
                         f"longer has: it changed since they were written. Start afresh in another folder, or after "
                         f"deleting this one")
    return met


def _chunks(samples: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """``samples`` read ``size`` at a time."""
    it = iter(samples)
    while chunk := list(islice(it, size)):
        yield chunk


class PartFiles:
    """The rows a resumable scoring run has written: ``pass<k>-rank<r>.jsonl`` under ``folder``, one JSON row a line,
    each file appended to by one process. A batch's rows reach the disk in one write, flushed and synced, so a
    process killed at any moment leaves whole rows and at most a torn last line: readers skip it, and the file's own
    process cuts it away before appending again."""

    def __init__(self, folder: str | Path, rank: int = 0) -> None:
        self.folder, self.rank = Path(folder), rank

    def rows(self, k: int) -> Iterator[dict]:
        """The whole rows of pass ``k``, every process's files in turn."""
        for path in sorted(self.folder.glob(f"pass{k}-rank*.jsonl")):
            with open(path, "rb") as f:
                for number, line in enumerate(f, 1):
                    if not line.endswith(b"\n"):
                        break  # torn: the process was killed while writing it
                    try:
                        yield json.loads(line)
                    except ValueError as err:
                        raise ValueError(f"{path}, line {number}: not a row ({err}); the file is damaged. Start "
                                         f"afresh in another folder, or after deleting {self.folder}") from err

    @contextmanager
    def appending(self, k: int) -> Iterator[Callable[[list[dict]], None]]:
        """A function that appends one batch's rows to this process's file of pass ``k`` and syncs it to the disk;
        a torn last line is cut away first."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"pass{k}-rank{self.rank}.jsonl"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.ftruncate(fd, _whole_lines(fd))

            def append(rows: list[dict]) -> None:
                data = memoryview("".join(json.dumps(r) + "\n" for r in rows).encode())
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)

            yield append
        finally:
            os.close(fd)

    def merged(self, passes: Sequence[ScoringPass], kinds: dict[str, str]) -> list[dict]:
        """score_offline's rows from every pass's part files, in index order, each with its ``extra`` merged in."""
        values: dict[int, dict] = {}
        extra: dict[int, dict] = {}
        for k, p in enumerate(passes):
            for r in self.rows(k):
                values.setdefault(r["index"], {}).update({key: r[key] for key in p.keys})
                if "extra" in r:
                    extra[r["index"]] = r["extra"]
        missing = [i for i, v in values.items() if len(v) != len(kinds)]
        if missing:
            raise ValueError(f"the part files in {self.folder} lack some pass's scores of {len(missing)} examples "
                             f"(example {missing[0]} first): a process has not finished")
        return [{**_offline_row(i, values[i], kinds), **extra.get(i, {})} for i in sorted(values)]


def _whole_lines(fd: int, block: int = 1 << 16) -> int:
    """The length of an open file up to its last newline: what remains once a torn last line is cut away."""
    pos = os.lseek(fd, 0, os.SEEK_END)
    while pos > 0:
        start = max(0, pos - block)
        newline = os.pread(fd, pos - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        pos = start
    return 0
