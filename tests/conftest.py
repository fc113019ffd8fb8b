"""Shared test set-up: offline, no wandb; the embedded tokenizer over a tiny model. Tiny models and data for
the core tests live in sqsd_lab.tiny."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _restore_environ():
    """os.environ as it was before each test: transformers < 5's TrainingArguments writes
    ACCELERATE_MIXED_PRECISION (and FSDP, DeepSpeed and dynamo variables) into it, and every later Trainer reads
    them back, so after a bf16 test an fp32 one trained under bf16 autocast (fixed upstream in transformers 5)."""
    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved) - {"PYTEST_CURRENT_TEST"}:
        del os.environ[key]
    os.environ.update({k: v for k, v in saved.items() if k != "PYTEST_CURRENT_TEST"})


@pytest.fixture(scope="session")
def gguf_tokenizer():
    """SmolLM2's tokenizer with its ChatML template, read from the embedded GGUF (about 5 s)."""
    from sqsd_lab.data import load_tokenizer
    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(gguf_tokenizer):
    """A random 2-layer Llama, hidden size 32, over the GGUF tokenizer's vocabulary, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(gguf_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=gguf_tokenizer.pad_token_id, eos_token_id=gguf_tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()

