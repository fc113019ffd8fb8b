"""Direction sets from a Hub repository laid out like the paper's release (PEFT adapters in subfolders, one in the
legacy .bin format), read offline from a Hugging Face cache this test builds itself."""

import pytest
import torch
from peft import get_peft_model_state_dict

from sqsd_callback import DirectionSet
from sqsd_lab.tiny import tiny_lora

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path):
    """models--org--sqsd-release in the cache layout huggingface_hub reads offline: refs/main → a snapshot."""
    repo = tmp_path / "cache" / "models--org--sqsd-release"
    snapshot = repo / "snapshots" / COMMIT
    danger, legacy = tiny_lora("llama", seed=1), tiny_lora("llama", seed=2)
    danger.save_pretrained(snapshot / "Direction" / "Beaver-Danger")
    legacy.save_pretrained(snapshot / "Direction" / "PKURLHF-10K_Safety")
    folder = snapshot / "Direction" / "PKURLHF-10K_Safety"
    (folder / "adapter_model.safetensors").unlink()
    torch.save(get_peft_model_state_dict(legacy), folder / "adapter_model.bin")  # PEFT's legacy format
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return tmp_path / "cache", {"danger": danger, "safety": legacy}


def test_from_pretrained_reads_subfolders_and_legacy_bin_offline(hub_cache, monkeypatch):
    cache, models = hub_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    danger = DirectionSet.from_pretrained("org/sqsd-release", subfolder="Direction/Beaver-Danger", kind="danger",
                                          cache_dir=cache)
    safety = DirectionSet.from_pretrained("org/sqsd-release@main:Direction/PKURLHF-10K_Safety", kind="safety",
                                          cache_dir=cache)
    assert danger.name == "Beaver-Danger" and safety.name == "PKURLHF-10K_Safety"
    for ds, model in ((danger, models["danger"]), (safety, models["safety"])):
        for m, t in ((n, mod) for n, mod in model.named_modules() if hasattr(mod, "lora_A") and mod.lora_A):
            name = m.removeprefix("base_model.model.")
            want = t.lora_B["default"].weight @ t.lora_A["default"].weight
            assert torch.allclose(ds.modules[name].materialize(), want, atol=1e-6), name
        assert len(ds.modules) == 6


def test_missing_repository_or_subfolder_is_named(hub_cache):
    cache, _ = hub_cache
    with pytest.raises(FileNotFoundError, match=r"Direction/Nope is not a PEFT adapter.*check the subfolder"):
        DirectionSet.from_pretrained("org/sqsd-release", subfolder="Direction/Nope", kind="danger", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"'org/absent' is neither a local folder nor a Hub repository"):
        DirectionSet.from_pretrained("org/absent", kind="danger", cache_dir=cache)
