"""The trained weights at the drift stop's last safe step: kept on the host while the run is below the threshold,
saved beside the run when it stops (the live parameters are not touched)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .distributed import full_parameters


class LastSafe:
    """Host copies of the trained ``params`` of ``model`` at the last safe step."""

    def __init__(self, model: nn.Module, params: list[torch.Tensor]) -> None:
        self.model, self.params = model, params
        ids = {id(p) for p in params}
        self.names = {n for n, p in model.named_parameters() if id(p) in ids}
        self.tensors: dict[str, torch.Tensor] | None = None

    def keep(self) -> None:
        """Copy the parameters now (whole where FSDP2 or ZeRO-3 shard them)."""
        with full_parameters(self.model, self.params):
            self.tensors = {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()
                            if n in self.names}

    def save(self, path: Path, step: int, main: bool) -> Path:
        """Write the model as it was at the last safe step: its saved state with the kept trained values (a PEFT
        model saves its adapter from them)."""
        from peft import PeftModel
        state = self.tensors if isinstance(self.model, PeftModel) else {**self.model.state_dict(), **self.tensors}
        if main:
            self.model.save_pretrained(str(path), state_dict=state)
            (path / "sqsd_step.json").write_text(json.dumps({"step": step}))
        return path
