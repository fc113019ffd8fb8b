"""One rank of the 2-process FSDP2 test on CPU (gloo): the tiny LoRA model trained through the Trainer under FSDP2
(``fsdp_version: 2``, each decoder layer sharded) with the monitor and a drift stop that saves the last safe
adapter; rank 0 keeps θ at every step (gathered) and whether the LoRA factors were really DTensors.

accelerate applies FSDP only on accelerators and on CPU silently trains DDP instead; this test process alone sets
accelerate's state to FSDP after the Trainer is built, and the test asserts that the factors were sharded.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor

from sqsd_callback import SQSDCallback
from sqsd_lab.tiny import three_sets, tiny_lora

from deepspeed_worker import SAMPLES, STOP
from helpers import ThetaEachStep, finish_worker, trainer

FSDP = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                            "sync_module_states": False})  # transformers < 5 syncs on a device


def run(out: Path) -> None:
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    thetas = ThetaEachStep()
    run = trainer(model, SAMPLES, out, [SQSDCallback(danger, safety, **STOP), thetas], accum=2, steps=10, **FSDP)
    state = run.accelerator.state  # the CPU adaptation: FSDP2 as on an accelerator (see the module docstring)
    plugin_args = getattr(run.args, "fsdp_plugin_args", None) or dict(  # transformers < 5 has no fsdp_plugin_args
        fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"], state_dict_type="FULL_STATE_DICT")
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
    state.distributed_type = DistributedType.FSDP
    run.is_fsdp_enabled = True
    run.train()
    if torch.distributed.get_rank() == 0:
        torch.save(thetas.theta, out / "thetas.pt")
        lora = [p for n, p in run.model.named_parameters() if "lora_" in n]
        sharded = all(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in lora)
        (out / "sharding.json").write_text(json.dumps({"sharded": sharded, "factors": len(lora)}))


if __name__ == "__main__":
    run(Path(sys.argv[1]))
    finish_worker()
