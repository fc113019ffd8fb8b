"""Training-style records from chat pairs: ``{"prompt", "response"}`` tokenized with a model's chat template, the
loss on the response's tokens only. The safety records of ``SQSDCallback(mask=...)`` are built here, from Python
or from a config file's path."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .types import IGNORE_INDEX


def chat_prompt(tokenizer, prompt: str, prefill: str = "", system: str | None = None) -> str:
    """The chat-templated text that asks the model to answer `prompt`, optionally after a `system` message and
    prefilling its turn."""
    messages = [*([{"role": "system", "content": system}] if system is not None else []),
                {"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill


class PromptTooLong(ValueError):
    """A chat-formatted prompt that leaves no room for response tokens within max_length."""


def tokenize_chat(tokenizer, prompt: str, response: str, max_length: int = 512) -> dict:
    """Token ids of one chat exchange with labels on the response tokens only (-100 elsewhere)."""
    head = chat_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):
        raise ValueError("the chat template renders the assistant turn in a way that does not extend the "
                         "generation prompt; cannot separate prompt from response tokens")
    prompt_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= max_length:
        raise PromptTooLong(f"the chat-formatted prompt is {len(prompt_ids)} tokens; max_length={max_length} "
                            "leaves no response tokens")
    response_ids = response_ids[: max_length - len(prompt_ids)]
    input_ids = prompt_ids + response_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
    }


def safety_records(source: str | Path | Iterable[dict], tokenizer=None, max_length: int = 512) -> list[dict]:
    """Records for ``SQSDCallback(mask=...)`` from a JSON lines file (or a JSON array) or an iterable of dicts:
    ``{"prompt", "response"}`` pairs are tokenized with ``tokenizer``'s chat template (loss on the response only),
    ``{"input_ids", "labels"}`` records are taken as they are."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no safety records at {path}: give a JSON lines file of {{\"prompt\", "
                                    f"\"response\"}} records (safe responses to harmful prompts)")
        text = path.read_text(encoding="utf-8")
        rows = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = list(source)
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, dict) and "input_ids" in row and "labels" in row:
            out.append(dict(row))
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            if tokenizer is None:
                raise ValueError(f"safety record {i} is a prompt/response pair: pass the tokenizer that formats "
                                 f"the training data so it can be tokenized with the same chat template")
            out.append(tokenize_chat(tokenizer, row["prompt"], row["response"], max_length))
        else:
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"safety record {i} has {found}: each record needs \"prompt\" and \"response\" "
                             f"strings, or tokenized \"input_ids\" and \"labels\"")
    if not out:
        raise ValueError("no safety records: the mask needs a few hundred safe responses to harmful prompts")
    return out
