"""The window experiment's statistics against hand-computed values, and a run on a tiny model."""

import json
import math

import numpy as np
import pytest

from sqsd_lab.windows import bootstrap_rho, spearman


def test_spearman_hand_computed():
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # ranks x = 1..5, y = (2, 1, 4, 3, 5): d² sums to 4 → rho = 1 − 6·4 / (5·24) = 0.8
    assert spearman([1, 2, 3, 4, 5], [0.2, 0.1, 0.4, 0.3, 0.5]) == pytest.approx(0.8)
    # ties take mean ranks: y ranks (1.5, 1.5, 3) against x (1, 2, 3): Pearson of those = 0.8660
    assert spearman([1, 2, 3], [5, 5, 9]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(spearman([1, 2, 3], [7, 7, 7]))


def test_bootstrap_interval_is_a_point_when_every_prompt_agrees_and_wide_when_they_do_not():
    ordered = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=float)
    lo, hi = bootstrap_rho(np.tile(ordered, 10), n_boot=200)  # harm never rises with rank on any resample
    assert hi <= 0 and lo == pytest.approx(-1.0)
    noise = np.random.default_rng(1).integers(0, 2, (4, 40)).astype(float)
    lo, hi = bootstrap_rho(noise, n_boot=300)
    assert lo < 0 < hi


@pytest.mark.slow
def test_run_windows_on_a_tiny_model(tmp_path, tiny_model, gguf_tokenizer):
    from sqsd_lab.adapters import build_directions, direction_sets, refusal_records
    from sqsd_lab.windows import run_windows

    harmful = [f"Explain forbidden thing {i}." for i in range(8)]
    pool = [{"prompt": f"What is {a} + 1?", "response": f"{a} + 1 = {a + 1}."} for a in range(12)]
    build_directions(tiny_model, gguf_tokenizer, tmp_path / "dirs",
                     danger=[{"prompt": p, "response": "Sure, here is how to do it."} for p in harmful],
                     safety=refusal_records(harmful), rank=2, max_length=64, num_train_epochs=1)
    danger, safety = direction_sets(tmp_path / "dirs")
    # θ_t: the danger adapter stands in for a fine-tuning checkpoint (any LoRA checkpoint of θ_0 will do)
    summary = run_windows(tiny_model, gguf_tokenizer, pool, harmful[:4], tmp_path / "w",
                          (tmp_path / "dirs" / "danger", danger), (tmp_path / "dirs" / "safety", safety),
                          tmp_path / "dirs" / "danger", k=3, rank=2, max_length=64, eval_tokens=4,
                          num_train_epochs=1, per_device_train_batch_size=4)
    assert summary["window_size"] == 4 and [w["window"] for w in summary["windows"]] == [1, 2, 3]
    means = [w["sqsd_mean"] for w in summary["windows"]]
    assert means == sorted(means, reverse=True)
    for w in summary["windows"]:  # harmfulness is 1 − the saved refusal rate of that window's model
        saved = json.loads((tmp_path / "w" / f"window_{w['window']}" / "refusal.json").read_text())
        assert w["harmfulness"] == pytest.approx(1 - saved["rate"]) and saved["n"] == 4
    assert set(summary["variants_rho"]) == {"danger only (cosine)", "SQSD, global_cosine"}
    assert (tmp_path / "w" / "windows.png").stat().st_size > 5000
    assert "| random |" in (tmp_path / "w" / "windows.md").read_text()


def test_across_seeds_against_hand_computed_values(tmp_path):
    """rho per seed, its mean with a t interval across seeds (t_0.975, 2 df = 4.303), harmfulness per window."""
    from sqsd_lab.windows import across_seeds, seeds_plot, seeds_table

    def summary(seed, harm, random):
        return {"seed": seed, "k": 3, "window_size": 4, "held_out": 10, "random": random,
                "rho": spearman([1, 2, 3], harm),
                "windows": [{"window": w + 1, "sqsd_mean": 3.0 - w, "harmfulness": h} for w, h in enumerate(harm)]}

    runs = [summary(0, [0.5, 0.4, 0.3], 0.45), summary(1, [0.5, 0.3, 0.4], 0.35), summary(2, [0.6, 0.2, 0.1], 0.4)]
    got = across_seeds(runs)
    assert got["rho_per_seed"] == pytest.approx([-1.0, -0.5, -1.0])
    mean, sd = -2.5 / 3, float(np.std([-1.0, -0.5, -1.0], ddof=1))
    assert got["rho_mean"] == pytest.approx(mean)
    half = 4.303 * sd / 3 ** 0.5
    assert got["rho_95_across_seeds"] == pytest.approx([max(-1.0, mean - half), mean + half])  # clipped at −1
    assert [w["harmfulness_mean"] for w in got["windows"]] == pytest.approx([16 / 30, 0.3, 0.8 / 3])
    assert got["windows"][0]["harmfulness_min"] == 0.5 and got["windows"][0]["harmfulness_max"] == 0.6
    assert got["rho_of_mean_harmfulness"] == pytest.approx(-1.0) and got["random"]["mean"] == pytest.approx(0.4)
    assert "-1.00, -0.50, -1.00" in seeds_table(got)
    seeds_plot(got, tmp_path / "seeds.png")
    assert (tmp_path / "seeds.png").stat().st_size > 5000


@pytest.mark.slow
def test_train_lora_is_reproducible_whatever_ran_before(tmp_path, tiny_model, gguf_tokenizer):
    """Two fine-tunes with the same seed give the same adapter even when the global RNG was used in between: the
    adapter's random initialisation is seeded too (the window and protection runs compare runs made in one
    process one after another)."""
    import torch
    from safetensors.torch import load_file

    from sqsd_lab.data import tokenize_chats
    from sqsd_lab.finetune import lora_config, train_lora

    samples = tokenize_chats(gguf_tokenizer, [{"prompt": f"What is {a} + 1?", "response": f"{a + 1}."}
                                              for a in range(4)], 64)
    for run in ("a", "b"):
        torch.rand(1000)  # something else used the global RNG in between
        train_lora(tiny_model, gguf_tokenizer, samples, tmp_path / run, lora=lora_config(2), seed=3,
                   num_train_epochs=1, per_device_train_batch_size=2)
    a, b = (load_file(str(tmp_path / r / "adapter_model.safetensors")) for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
