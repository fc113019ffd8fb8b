"""Where a PEFT adapter lies: a local folder, or a Hub repository fetched through huggingface_hub (its cache, its
offline mode and the user's token)."""

from __future__ import annotations

import json
from pathlib import Path

from ..naming import canonical_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # the second: PEFT's legacy format


def adapter_dir(ref: str | Path, subfolder: str | None = None, revision: str | None = None, token=None,
                cache_dir: str | Path | None = None) -> Path:
    """A PEFT adapter's local folder: a local path, or a Hub repository ``org/name`` (also written
    ``org/name@revision:sub/folder``) fetched through huggingface_hub (its cache and offline mode, the user's token),
    then ``subfolder``. The folder must hold adapter_config.json and adapter_model.safetensors (or legacy .bin)."""
    text = str(ref)
    path = Path(text).expanduser()
    if not path.exists() and not text.startswith((".", "/", "~")):
        repo, _, sub = text.partition(":")
        repo, _, rev = repo.partition("@")
        if repo.count("/") == 1:
            subfolder, revision = subfolder or sub or None, revision or rev or None
            from huggingface_hub import snapshot_download
            patterns = [f"{subfolder}/adapter_*", f"{subfolder}/*.json"] if subfolder else ["adapter_*", "*.json"]
            try:
                path = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, token=token,
                                              cache_dir=cache_dir))
            except Exception as err:  # hub errors vary (offline, missing repo, auth); name what was tried
                raise FileNotFoundError(f"adapter {text!r} is neither a local folder nor a Hub repository that could "
                                        f"be fetched (revision {revision or 'main'}): {err}. Offline, the repository "
                                        f"must be in the Hugging Face cache already.") from err
    if subfolder:
        path = path / subfolder
    missing = [ADAPTER_CONFIG] if not (path / ADAPTER_CONFIG).is_file() else []
    if not any((path / w).is_file() for w in ADAPTER_WEIGHTS):
        missing.append(ADAPTER_WEIGHTS[0])
    if missing:
        raise FileNotFoundError(f"{path} is not a PEFT adapter: {', '.join(missing)} missing (PEFT's legacy "
                                f"{ADAPTER_WEIGHTS[1]} is read too; save one with `model.save_pretrained(dir)` on a "
                                f"PEFT model{'; check the subfolder' if subfolder else ''}).")
    return path


def adapter_shapes(path: str | Path) -> dict[str, tuple[int, int]]:
    """The out×in shape of each LoRA update (lora_B @ lora_A) in the adapter folder ``path``, by the base model's
    module name, read from the safetensors header without loading the weights; {} where the file cannot be read
    (PEFT's own loading then names the problem)."""
    path = Path(path)
    file = next((path / w for w in ADAPTER_WEIGHTS if (path / w).is_file()), None)
    try:
        if file is None:
            return {}
        if file.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(file), "pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        else:
            import torch
            shapes = {k: tuple(v.shape) for k, v in torch.load(file, map_location="cpu", weights_only=True).items()}
    except Exception:  # a torn or foreign file: left to the loader that reads it
        return {}
    factors: dict[str, dict[str, tuple]] = {}
    for key, shape in shapes.items():
        for part in ("lora_A", "lora_B"):
            if f".{part}." in key and key.endswith("weight") and len(shape) == 2:
                factors.setdefault(canonical_name(key.split(f".{part}.")[0]), {})[part] = shape
    return {m: (f["lora_B"][0], f["lora_A"][1]) for m, f in factors.items() if len(f) == 2}


def lora_config_fields(file: str | Path) -> dict:
    """The fields of a PEFT adapter_config.json, refused unless they describe plain LoRA (another PEFT type, or DoRA,
    whose update is not B@A, cannot be a direction or a scored fine-tune)."""
    try:
        config = json.loads(Path(file).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err}); re-save the adapter.") from err
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file} is a {config['peft_type']} config; SQSD needs a LoRA adapter.")
    if config.get("use_dora"):
        raise ValueError(f"{file} is a DoRA config; its update is not B@A. Use a plain LoRA adapter.")
    return config
