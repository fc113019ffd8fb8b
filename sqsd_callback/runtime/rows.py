"""A micro-batch's score rows: its examples identified (the dataset's own ``index`` where it reached the batch, else
by their tokens), first-seen texts noted, and the engine's stats turned into per-example scores."""

from __future__ import annotations

from ..bank import DirectionBank
from ..once import WarnOnce
from ..scoring import project, rows
from ..types import IGNORE_INDEX
from .identity import ExampleIndex
from .recorder import MicroBatch

TEXT_CHARS = 600


class ExampleTexts:
    """The decoded start of each example the first time the run sees it (examples.jsonl, the wandb table), split
    at its first scored token into the end of its prompt and the start of its response."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.seen, self.new = tokenizer, set(), []

    def note(self, index: list, ids: list, labels: list) -> None:
        if self.tokenizer is None:
            return
        for i, example_ids, example_labels in zip(index, ids, labels):
            if i is not None and i not in self.seen:
                self.seen.add(i)
                self.new.append({"index": i, **self._texts(example_ids, example_labels)})

    def take(self) -> list[dict]:
        """The texts noted since the last call."""
        new, self.new = self.new, []
        return new

    def _texts(self, ids, labels) -> dict[str, str]:
        decode = lambda t: self.tokenizer.decode(t.tolist(), skip_special_tokens=True)  # noqa: E731
        scored = (labels != IGNORE_INDEX).nonzero()
        first = int(scored[0]) if len(scored) else len(ids)
        return {"text": decode(ids)[:TEXT_CHARS], "prompt": decode(ids[:first])[-TEXT_CHARS // 2:],
                "response": decode(ids[first:])[:TEXT_CHARS // 2]}


class RowMaker:
    """Score rows of micro-batches, at batch-size-1 scale: hook gradients carry the step's loss weights, which each
    micro-batch read off its backward pass."""

    def __init__(self, bank: DirectionBank, metric: str, index: ExampleIndex, texts: ExampleTexts,
                 warn: WarnOnce) -> None:
        self.bank, self.metric, self.index, self.texts, self.warn = bank, metric, index, texts, warn

    def __call__(self, mb: MicroBatch, in_step: bool) -> list[dict]:
        """The rows of ``mb`` (``in_step``: its stats come from the step's own backward, in its loss weights)."""
        host = mb.batch.to("cpu")
        host.index = mb.own_index.tolist() if mb.own_index is not None else self.index.lookup(host.example_ids())
        mb.batch.index = host.index
        self.texts.note(host.index, host.example_ids(), host.example_labels())
        scale = None
        if in_step and not mb.recomputed:
            scale = mb.scale()
            if scale is None and self.metric == "projection":
                self.warn("weights", "SQSDCallback could not read the loss weights (no `loss` or `log_probs` in the "
                          "model outputs): projection scores are in the units of the Trainer's loss "
                          "normalisation, not per example.")
        out = rows(project(mb.stats, self.bank, self.metric, scale), self.bank, host.n_scored, host.index)
        for r in out:
            r["dropped"] = False
        return out
