"""One rank of the 2-process CPU (gloo) DDP test: trains the tiny LoRA model with SQSDCallback.

    torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR
"""

import sys

import torch.distributed
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from sqsd_callback import SQSDCallback
from sqsd_callback.testing import pad_collator, random_samples, three_sets, tiny_lora

if __name__ == "__main__":
    model = tiny_lora("llama")
    danger, safety = three_sets(model)
    args = TrainingArguments(output_dir=sys.argv[1], per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, gradient_checkpointing=True, seed=1)
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(random_samples(16, seed=3)),
            data_collator=pad_collator("left"), callbacks=[SQSDCallback(danger, safety, metric="projection")]).train()
    torch.distributed.destroy_process_group()  # a clean gloo shutdown before the interpreter exits
