"""An axolotl plugin: SQSDCallback configured in the training YAML.

    plugins:
      - sqsd_callback.integrations.axolotl.SQSDPlugin
    sqsd_danger: [Direction/Beaver-Danger]          # adapters: local folders or Hub org/name[@rev][:subfolder]
    sqsd_safety: [Direction/PKURLHF-10K_Safety]
    sqsd:                                           # SQSDConfig options
      drop_zscore_above: 2.0
      stop_drift_above: 0.2
    sqsd_mask: refusals.jsonl                       # optional: WaRP mask from {"prompt", "response"} records

The plugin's arguments join axolotl's config schema (``get_input_args``) and the callback joins the trainer once
axolotl has built it (``add_callbacks_post_trainer``). Without axolotl installed the module still imports (the
plugin is then a plain class), so the configuration path stays testable.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from . import callback_from_options

try:
    from axolotl.integrations.base import BasePlugin
except ImportError:  # axolotl absent: the plugin is only constructed by axolotl's plugin manager
    BasePlugin = object


class SQSDArgs(BaseModel):
    """The plugin's keys in axolotl's YAML."""

    sqsd_danger: list[str] = Field(default_factory=list, description="danger direction adapters")
    sqsd_safety: list[str] = Field(default_factory=list, description="safety direction adapters")
    sqsd_anchor: str | None = Field(default=None, description="adapter the AsFT anchor constrains the update to")
    sqsd_mask: str | None = Field(default=None, description="JSON lines file of prompt/response safety records "
                                  "for the WaRP mask (tokenized with the run's chat template)")
    sqsd: dict[str, Any] | None = Field(default=None, description="SQSDConfig options")


class SQSDPlugin(BasePlugin):
    """Adds SQSDCallback, built from the YAML's ``sqsd_*`` keys, to the trainer axolotl builds."""

    def get_input_args(self) -> str:
        return "sqsd_callback.integrations.axolotl.SQSDArgs"

    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        """The callback for ``trainer``; an empty training set is refused here, before the Trainer's sampler fails
        on it with torch's "num_samples should be a positive integer value"."""
        dataset = getattr(trainer, "train_dataset", None)
        if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError("The training set is empty (0 examples after axolotl's preparation), so there is "
                             "nothing to train or score. Check the `datasets:` paths and splits in the YAML, and the "
                             "filters that can drop every example (sequence_len, the chat template's roles).")
        tokenizer = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
        return [callback_from_options({k: cfg.get(k) for k in SQSDArgs.model_fields}, tokenizer,
                                      cfg.get("sequence_len") or 512)]
