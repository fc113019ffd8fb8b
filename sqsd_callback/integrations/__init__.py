"""SQSDCallback from a training framework's YAML config: the ``sqsd_*`` keys every integration reads (axolotl's
plugin, a LLaMA-Factory or plain-Trainer YAML loaded by the user's script)."""

from __future__ import annotations

from collections.abc import Mapping

KEYS = ("sqsd_danger", "sqsd_safety", "sqsd_anchor", "sqsd_mask", "sqsd")
"""``sqsd_danger`` / ``sqsd_safety``: lists of PEFT adapters (local folders or Hub ``org/name[@revision][:subfolder]``);
``sqsd_anchor``: one adapter for the AsFT anchor; ``sqsd_mask``: a JSON lines file of safety records
(``{"prompt", "response"}``) for the WaRP mask; ``sqsd``: SQSDConfig options (a mapping)."""


def callback_from_options(options: Mapping, tokenizer=None, max_length: int = 512):
    """An SQSDCallback built from the ``sqsd_*`` keys of a config mapping; a misspelled option is an error naming
    the valid ones (SQSDConfig's check) before any model is loaded. ``tokenizer`` and ``max_length`` tokenize the
    ``sqsd_mask`` records as the training data are (the chat template, loss on the response)."""
    from ..callback import SQSDCallback
    from ..config import SQSDConfig
    from ..directions import DirectionSet
    from ..records import safety_records

    unknown = [k for k in options if k.startswith("sqsd") and k not in KEYS]
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown}: the keys SQSDCallback reads are {list(KEYS)} (SQSDConfig's "
                         f"options go under `sqsd:`).")

    def refs(key):
        value = options.get(key) or []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{key} must be a list of adapter folders or Hub ids, got {value!r}.")
        return list(value)

    danger = [DirectionSet.from_pretrained(r, kind="danger") for r in refs("sqsd_danger")]
    safety = [DirectionSet.from_pretrained(r, kind="safety") for r in refs("sqsd_safety")]
    anchor = options.get("sqsd_anchor")
    anchor = DirectionSet.from_pretrained(anchor, kind="safety", name="anchor") if anchor else None
    config = SQSDConfig.from_dict(dict(options.get("sqsd") or {}))
    mask = options.get("sqsd_mask")
    if mask is not None and not isinstance(mask, str):
        raise TypeError(f"sqsd_mask must be the path of a JSON lines file of safety records, got {mask!r}.")
    mask = safety_records(mask, tokenizer, max_length) if mask else None
    return SQSDCallback(danger, safety, config, anchor=anchor, mask=mask)
