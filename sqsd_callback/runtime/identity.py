"""Which training-dataset position each batch row came from, without touching the user's data or collator.

The Trainer drops columns the model's forward does not take and shuffles, so an added index column would not
reach the batch. Instead each example's token ids are hashed once at train start and each batch row's
(unpadded) ids are looked up; duplicates resolve to their first position and are counted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from ..once import WarnOnce


def token_hash(ids: Sequence[int] | np.ndarray | torch.Tensor) -> bytes:
    """A 16-byte digest of a token-id sequence (dtype- and container-independent)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).digest()


class ExampleIndex:
    """Maps token-id sequences back to their position in the training dataset."""

    def __init__(self, dataset) -> None:
        self.positions: dict[bytes, int] = {}
        self.duplicates = 0
        self.packed = _is_packed(dataset)
        for pos, ids in enumerate(_examples(dataset)):
            key = token_hash(ids)
            if key in self.positions:
                self.duplicates += 1
            else:
                self.positions[key] = pos
        self.misses = 0
        self.warn = WarnOnce()

    def __len__(self) -> int:
        return len(self.positions)

    def lookup(self, examples: list[torch.Tensor]) -> list[int | None]:
        """Dataset positions of a batch's examples, given each one's token ids (None for one not found)."""
        out = []
        for ids in examples:
            pos = self.positions.get(token_hash(ids))
            if pos is None:
                self.misses += 1
                self.warn("miss", "A training batch row matches no dataset example (does the collator change "
                          "input_ids?); its scores are logged with index null.")
            out.append(pos)
        return out


def dataset_examples(dataset) -> list[list[int]]:
    """The token ids of every example as SQSDCallback numbers them (``index`` in scores.jsonl is a position in this
    list): the training dataset's rows, or, for a dataset packed by TRL (``SFTConfig(packing=True)``), each packed
    row split by its ``seq_lengths``, in packed order. Packing reorders the examples and keeps no column that
    names the original row, so ``tokenizer.decode(dataset_examples(trainer.train_dataset)[index])`` (or
    examples.jsonl's ``text``) is the way back to it."""
    return [list(ids) for ids in _examples(dataset)]


def _is_packed(dataset) -> bool:
    return hasattr(dataset, "column_names") and "seq_lengths" in dataset.column_names


def _examples(dataset):
    """Each example's token ids; a dataset packed by TRL is split into its examples, in packed order."""
    rows = _input_ids_column(dataset)
    if not _is_packed(dataset):
        yield from rows
        return
    for ids, lengths in zip(rows, dataset["seq_lengths"]):
        start = 0
        for n in lengths:
            yield ids[start:start + n]
            start += n


def _input_ids_column(dataset):
    """The dataset's ``input_ids``, column-wise where the dataset supports it."""
    if dataset is None:
        return []
    try:
        return dataset["input_ids"] if hasattr(dataset, "column_names") else (ex["input_ids"] for ex in dataset)
    except (KeyError, TypeError) as e:
        raise ValueError("The training dataset has no 'input_ids': SQSDCallback needs a tokenized dataset "
                         "(SFTTrainer tokenizes it for you; with Trainer, map your tokenizer over it).") from e
