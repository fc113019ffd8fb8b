"""The lab around the sqsd_callback library: the ``sqsd`` command (demo, directions, score, report), the embedded
default model and data, direction adapters built from data, refusal measures, plots and reports, the experiments,
and tiny random models for tests and benchmarks. Installed with the ``app`` extra.

The embedded default model in your own script (its GGUF file, loaded dequantized and trainable)::

    from sqsd_lab import load_model
    model, tokenizer = load_model()  # SmolLM2-135M-Instruct; or load_model(a folder, hub name or .gguf path)

Under transformers 5, ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` alone gives a model the
Trainer refuses to train (it is marked quantized). The public names load on first use: ``import sqsd_lab``
imports no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqsd_callback.lazy import lazy_names

__all__ = ["default_model_path", "load_model", "load_tokenizer"]
_WHERE = {"default_model_path": ".data", "load_model": ".data", "load_tokenizer": ".data"}

if TYPE_CHECKING:
    from .data import default_model_path, load_model, load_tokenizer


__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
