"""TRL's preference trainers as the monitor sees them: a DPOTrainer micro-batch is B pairs, scored one example per
pair; every other TRL trainer whose loss is not the examples' mean cross-entropy is refused before step 1.

TRL (≥ 1.15) lays a DPO micro-batch out as 2B rows, the B chosen sequences then the B rejected ones
(``DataCollatorForPreference``: ``input_ids = prompt_chosen_ids + prompt_rejected_ids``; ``_compute_loss``:
``chosen_logps, rejected_logps = logps.chunk(2, dim=0)  # batch is [chosen, rejected]``), calls the model with the
completion tokens as ``labels`` and sums its per-token ``log_probs`` over each row. The loss is the mean over the
pairs of a function of each pair's own log-probabilities (``loss += per_sequence_loss.mean() * loss_weight``; the
reference log-probabilities are constants), and the Trainer divides it by the step's micro-batches
(``loss_is_scaled_for_ga = False``: ``loss / self.current_gradient_accumulation_steps``, which is
``len(batch_samples)``). So pair i is one example made of rows i and i + B: its gradient in the step, summed over both
rows' tokens, is 1 / (B · micro-batches) of the gradient of its loss alone."""

from __future__ import annotations

import re
from importlib.metadata import version
from typing import TYPE_CHECKING

import torch

from ..types import Segments

if TYPE_CHECKING:
    from .recorder import MicroBatch

PER_PAIR_LOSSES = frozenset({"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                             "apo_zero", "apo_down", "discopop", "sigmoid_norm"})
"""DPO loss types whose term for a pair depends on that pair's log-probabilities alone (TRL 1.16's list, less ``aot``
and ``aot_unpaired``, which sort the batch's log-ratios, and ``sft``, a token mean over the whole batch)."""
FIRST_TRL = (1, 15)
"""The first TRL whose DPOTrainer passes the completion tokens to the model as labels (1.14 and earlier compute the
log-probabilities from the logits themselves, so the monitor could not tell which tokens a row is scored on)."""
CROSS_ENTROPY_CONFIGS = ("SFTConfig",)
"""TRL configs whose trainers train on the model's own mean cross-entropy, scored as any Trainer's."""
OTHER_LOSSES = {
    "KTOConfig": "KTO compares each example's reward with a KL estimate taken over the batch",
    "ORPOConfig": "ORPO adds an odds-ratio term to the chosen responses' cross-entropy averaged over the batch",
    "CPOConfig": "CPO adds a preference term to the chosen responses' cross-entropy averaged over the batch",
}


def trl_config(args) -> str | None:
    """The TRL config class ``args`` is an instance of (the first of its classes TRL defines, so a user's subclass of
    DPOConfig counts as DPOConfig and TRL's own GKDConfig, a subclass of SFTConfig, as itself); None where TRL
    defines none of them (plain TrainingArguments)."""
    return next((c.__name__ for c in type(args).__mro__ if c.__module__.split(".")[0] == "trl"), None)


def preference_pairs(args, model: torch.nn.Module, engine: str, edits: bool) -> PreferencePairs | None:
    """Before step 1: the pairs of a DPOTrainer run (refusing what a pair's score cannot follow exactly), None for a
    trainer on the mean cross-entropy, and an error naming any other TRL trainer's loss."""
    name = trl_config(args)
    if name is None or name in CROSS_ENTROPY_CONFIGS:
        return None
    if name != "DPOConfig":
        why = OTHER_LOSSES.get(name, "its loss is neither the examples' mean cross-entropy nor DPO's pair loss")
        raise ValueError(f"{name}: {why}, so no example's gradient in the step is its own to score. SQSDCallback "
                         f"scores Trainer and TRL's SFTTrainer (each example's mean cross-entropy) and TRL's "
                         f"DPOTrainer (each preference pair). Train with one of those, or score the data offline "
                         f"(`sqsd score`, sqsd_callback.score_samples).")
    installed = version("trl")
    if tuple(int(x) for x in re.findall(r"\d+", installed)[:2]) < FIRST_TRL:
        raise ValueError(f"TRL {installed}'s DPOTrainer computes the log-probabilities from the logits itself, so "
                         f"SQSDCallback cannot tell which tokens of a pair are scored. Upgrade TRL "
                         f"(pip install 'trl>={'.'.join(map(str, FIRST_TRL))}'; tested with 1.16).")
    losses = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    coupled = [t for t in losses if t not in PER_PAIR_LOSSES]
    if coupled:
        raise ValueError(f"DPOConfig(loss_type={losses}): {coupled} couple the pairs of a batch ('aot' sorts their "
                         f"log-ratios, 'sft' averages the chosen tokens over the batch), so a pair's gradient is not "
                         f"its own. Use per-pair loss types with SQSDCallback: {sorted(PER_PAIR_LOSSES)}.")
    text = model.config.get_text_config()
    coef = args.router_aux_loss_coef
    coef = getattr(text, "router_aux_loss_coef", 0.0) if coef is None else coef
    if hasattr(text, "output_router_logits") and coef:
        raise ValueError(f"DPOTrainer adds the router's load-balancing loss (router_aux_loss_coef={coef}); it "
                         f"couples the pairs of a batch, so no pair's gradient is its own. Set "
                         f"DPOConfig(router_aux_loss_coef=0.0) to train with SQSDCallback.")
    if engine != "hooks":
        raise ValueError(f"engine={engine!r} scores each example's own cross-entropy by extra passes; a DPO pair's "
                         f"gradient is read off the step's own backward. Use engine='hooks' with DPOTrainer.")
    if edits:
        raise ValueError("Drops and the anchor are not supported under DPOTrainer: removing a pair would renormalise "
                         "the step by its pair count, which they do not do. Monitor DPO runs (scores, drift, "
                         "stop_drift_above) without drop_* options or anchor.")
    return PreferencePairs(args.max_length, args.truncation_mode)


class PreferencePairs:
    """A DPO run's micro-batches as pairs: which rows make each pair, its share of the step's loss, and the
    training dataset as one token sequence per pair (what identifies a pair in a batch)."""

    def __init__(self, max_length: int | None, truncation_mode: str) -> None:
        self.max_length, self.truncation_mode = max_length, truncation_mode

    def segments(self, mask: torch.Tensor, packed: bool) -> Segments:
        """Pair i = rows i (chosen) and i + B (rejected) of a (2B × T) batch: its tokens are both rows' real ones."""
        if packed:
            raise ValueError("position_ids restart inside the rows of this DPO batch (padding_free=True packs the "
                             "sequences), so its rows are not the chosen and rejected sequences of its pairs. Set "
                             "DPOConfig(padding_free=False) to train with SQSDCallback.")
        rows, T = mask.shape
        B = rows // 2
        start = torch.arange(B, device=mask.device)[:, None] * T
        ar = torch.arange(T, device=mask.device)
        gather = torch.cat([start + ar, start + B * T + ar], 1)
        return Segments(gather, torch.cat([mask[:B], mask[B:]], 1).bool())

    def weigh(self, step: list[MicroBatch]) -> None:
        """Each pair's share of the step's loss (the module's docstring): 1 / (its micro-batch's pairs × the step's
        micro-batches)."""
        for mb in step:
            mb.loss_share = 1.0 / (mb.batch.n_examples * len(step))

    def examples(self, dataset) -> list[dict]:
        """The training dataset as the batches show its pairs: per pair, prompt + chosen then prompt + rejected, each
        truncated as DataCollatorForPreference truncates it (empty where the dataset has no token columns)."""
        columns = ("prompt_ids", "chosen_ids", "rejected_ids")
        if not set(columns) <= set(getattr(dataset, "column_names", None) or ()):
            return []
        keep = slice(None)
        if self.max_length is not None:
            keep = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length,
                                                                                                   None)
        return [{"input_ids": (p + c)[keep] + (p + r)[keep]} for p, c, r in zip(*(dataset[k] for k in columns))]
