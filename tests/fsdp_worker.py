"""One rank of the 2-process FSDP2 tests on CPU (gloo): the tiny LoRA model trained through the Trainer under FSDP2
(``fsdp_version: 2``, each decoder layer sharded), one launch for all runs: the monitor with a drift stop that
saves the last safe adapter, and drops (with the anchor; and in full fine-tuning); rank 0 keeps θ at every step
(gathered) and whether the trained weights were really DTensors.

accelerate applies FSDP only on accelerators and on CPU silently trains DDP instead; this test process alone sets
accelerate's state to FSDP after the Trainer is built, and the test asserts that the factors were sharded.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor

from sqsd_callback import SQSDCallback
from sqsd_lab.tiny import three_sets, tiny_full_ft, tiny_lora

from ddp_worker import TRAIN, anchor_set
from deepspeed_worker import SAMPLES, STOP
from helpers import ThetaEachStep, finish_worker, trainer

FSDP = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                            "sync_module_states": False})  # transformers < 5 syncs on a device


RUNS = {  # name: (model, callback options, trainer options); the monitor's run stops itself after 3 steps
    "monitor": (tiny_lora, STOP, dict(accum=2, steps=10)),
    "top_anchor": (tiny_lora, dict(drop_top_fraction=0.5, anchor_lambda=0.5), TRAIN),  # clipping active
    "zscore": (tiny_lora, dict(drop_zscore_above=0.3, drop_min_history=4, exclude_dropped=True), TRAIN),
    "full_ft_top": (tiny_full_ft, dict(drop_top_fraction=0.5), TRAIN),
}


def run(out: Path, name: str) -> None:
    make, options, extra = RUNS[name]
    model = make("llama")
    danger, safety = three_sets(model)
    if "anchor_lambda" in options:
        options = dict(options, anchor=anchor_set(model))
    thetas = ThetaEachStep()
    out = out / name
    run = trainer(model, SAMPLES, out, [SQSDCallback(danger, safety, **options), thetas], **extra, **FSDP)
    state = run.accelerator.state  # the CPU adaptation: FSDP2 as on an accelerator (see the module docstring)
    plugin_args = getattr(run.args, "fsdp_plugin_args", None) or dict(  # transformers < 5 has no fsdp_plugin_args
        fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"], state_dict_type="FULL_STATE_DICT")
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState sets it for FSDP:
    # each later AcceleratorState() copies PartialState's type over its own, and SQSDCallback would then see DDP
    run.is_fsdp_enabled = True
    run.train()
    if torch.distributed.get_rank() == 0:
        torch.save(thetas.theta, out / "thetas.pt")
        trained = [p for p in run.model.parameters() if p.requires_grad]
        sharded = all(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in trained)
        (out / "sharding.json").write_text(json.dumps({"sharded": sharded, "factors": len(trained)}))


if __name__ == "__main__":
    for name in RUNS:
        run(Path(sys.argv[1]), name)
    finish_worker()
