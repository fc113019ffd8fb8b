"""What the run's logs say between logging steps: the scores and drops since the last one, the riskiest examples
so far, and the latest drift."""

from __future__ import annotations

from ..scoring import riskiest


class RunSummary:
    """The logging window's SQSD values, drops and examples without a scored token, the ``top_k`` riskiest
    examples, and the last drift scalars."""

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self.values: list[float] = []
        self.dropped = 0
        self.unscored = 0
        self.top: list[dict] = []
        self.drift: dict[str, float | None] = {}

    def observe(self, rows: list[dict], drift: dict[str, float | None] | None) -> None:
        """One optimizer step's rows (every process's) and drift scalars (None without direction sets)."""
        for r in rows:
            self.dropped += bool(r["dropped"])
            if r["sqsd"] is not None:
                self.values.append(r["sqsd"])
            else:  # every label -100 (a score is null only then)
                self.unscored += 1
        if drift is not None:
            self.top = riskiest(self.top + rows, self.top_k)
            self.drift = drift

    def pop(self) -> tuple[dict[str, float], list[float]]:
        """The ``sqsd/*`` scalars of the window now closing, and its SQSD values; the next window starts empty.
        ``sqsd/unscored_examples`` (examples whose labels are all -100) is logged only where there were some."""
        values, dropped, self.values, self.dropped = self.values, self.dropped, [], 0
        unscored, self.unscored = self.unscored, 0
        scalars = {f"sqsd/{k}": v for k, v in self.drift.items() if v is not None}
        scalars["sqsd/dropped"] = dropped
        if unscored:
            scalars["sqsd/unscored_examples"] = unscored
        if values:
            scalars.update({"sqsd/batch_sqsd_mean": sum(values) / len(values), "sqsd/batch_sqsd_max": max(values)})
        return scalars, values

    def state_dict(self) -> dict:
        return {"window": [self.values, self.dropped, self.unscored], "last_drift": self.drift, "top": self.top}

    def load_state_dict(self, saved: dict) -> None:
        self.values, self.dropped, *unscored = saved["window"]  # a checkpoint from before unscored was counted
        self.unscored = unscored[0] if unscored else 0
        self.drift, self.top = saved["last_drift"], saved.get("top", [])
