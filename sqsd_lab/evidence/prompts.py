"""Held-out benign prompts that look risky (XSTest-style), for measuring over-refusal.

Written fresh for this package, not copied from XSTest (Röttger et al. 2024), though they follow its idea and some of
its categories: homonyms ("kill a process"), safe targets, safe contexts (games, fiction, history), definitions,
safety information, figurative language, public facts, health. A model that refuses them refuses too much; a safety
intervention that raises their refusal rate buys safety with usefulness.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data"


def benign_risky_prompts(category: str | None = None) -> list[dict]:
    """The benign risky-looking prompts as {"prompt", "category"}, all or one category's."""
    rows = [json.loads(line) for line in (DATA / "benign_risky.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    if category is None:
        return rows
    kept = [r for r in rows if r["category"] == category]
    if not kept:
        raise ValueError(f"no category {category!r}; the categories are {sorted({r['category'] for r in rows})}")
    return kept
