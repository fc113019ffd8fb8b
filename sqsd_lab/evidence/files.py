"""Results and input files written so that a killed run leaves each either absent or complete."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, data: dict) -> None:
    """Write JSON so that ``path`` is either absent or complete: a temporary file, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def cached_jsonl(path: Path, make: Callable[[], list[dict]]) -> list[dict]:
    """Records read from ``path``, made and written (atomically) first where it is missing."""
    if not path.is_file():
        rows = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
