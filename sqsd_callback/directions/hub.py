"""Where a PEFT adapter lies: a local folder, or a Hub repository fetched through huggingface_hub (its cache, its
offline mode and the user's token)."""

from __future__ import annotations

from pathlib import Path

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
