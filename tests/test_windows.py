"""The window experiment's statistics against hand-computed values, and a run on a tiny model."""

import json
import math

import numpy as np
import pytest

from sqsd_lab.evidence.stats import spearman
from sqsd_lab.windows import bootstrap_rho, variant_correlations


def test_spearman_hand_computed():
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # ranks x = 1..5, y = (2, 1, 4, 3, 5): d² sums to 4 → rho = 1 − 6·4 / (5·24) = 0.8
    assert spearman([1, 2, 3, 4, 5], [0.2, 0.1, 0.4, 0.3, 0.5]) == pytest.approx(0.8)
    # ties take mean ranks: y ranks (1.5, 1.5, 3) against x (1, 2, 3): Pearson of those = 0.8660
    assert spearman([1, 2, 3], [5, 5, 9]) == pytest.approx(math.sqrt(3) / 2)
    assert spearman([1, 2, 3], [7, 7, 7]) is None


def test_variant_correlations_are_null_not_nan_where_undefined():
    """A constant variant has no rank correlation: None, which JSON writes as null (NaN is not JSON)."""
    rows = [{"index": i, "sqsd": s, "danger": 0.5} for i, s in enumerate([0.3, 0.1, 0.2, 0.4])]
    rho = variant_correlations({"cosine": rows, "global_cosine": rows}, None)
    assert rho == {"danger only (cosine)": None, "SQSD, global_cosine": pytest.approx(1.0)}
    json.dumps(rho, allow_nan=False)


def test_bootstrap_interval_is_a_point_when_every_prompt_agrees_and_wide_when_they_do_not():
    ordered = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=float)
    lo, hi = bootstrap_rho(np.tile(ordered, 10), n_boot=200)  # harm never rises with rank on any resample
    assert hi <= 0 and lo == pytest.approx(-1.0)
    noise = np.random.default_rng(1).integers(0, 2, (4, 40)).astype(float)
    lo, hi = bootstrap_rho(noise, n_boot=300)
    assert lo < 0 < hi


def test_windows_within_strata_by_hand():
    """Each stratum ranked on its own, cut into k windows, each cut to the stratum's smallest window; window w joins
    the strata's w-th (hand-worked: a = 7 rows → windows of 4, 3 cut to 3; b = 4 rows → 2, 2)."""
    from sqsd_lab.screening import windows_within

    a = [(0, 0.9), (1, 0.1), (2, 0.5), (3, 0.7), (4, -0.2), (5, 0.3), (6, 0.0)]
    b = [(7, 5.0), (8, -1.0), (9, 2.0), (10, 3.0)]
    rows = [{"index": i, "sqsd": v} for i, v in a + b] + [{"index": 11, "sqsd": None}]
    strata = ["a"] * 7 + ["b"] * 5
    got = windows_within(rows, 2, strata)
    # a by SQSD: 0 (.9), 3 (.7), 2 (.5), 5 (.3), 1 (.1), 6 (0), 4 (−.2) → [0, 3, 2, 5 | 1, 6, 4] → 3 each
    # b: 7 (5), 10 (3), 9 (2), 8 (−1) → [7, 10 | 9, 8]
    assert [w["indices"] for w in got] == [[0, 3, 2, 7, 10], [1, 6, 4, 9, 8]]
    assert [w["strata"] for w in got] == [{"a": 3, "b": 2}, {"a": 3, "b": 2}]
    assert got[0]["sqsd_mean"] == pytest.approx((0.9 + 0.7 + 0.5 + 5 + 3) / 5)
    assert (got[1]["sqsd_max"], got[1]["sqsd_min"]) == (2.0, -1.0)
    with pytest.raises(ValueError, match=r"strata \{'b': 4\} have fewer scored examples than the 5 windows"):
        windows_within(rows, 5, strata)


def _evaluation(harmful: list, margins: list[float]) -> dict:
    """A judge_generations-shaped evaluation: phrase outcomes from ``harmful`` (degenerate where None)."""
    phrase = ["degenerate" if h is None else "compliance" if h else "refusal" for h in harmful]
    return {"outcomes": {"phrase": phrase, "likelihood": ["compliance" if m > 0 else "refusal" for m in margins]},
            "scores": {"likelihood": margins}}


def test_measures_by_hand():
    from sqsd_lab.windows import measures

    got = measures(_evaluation([True, None, False], [0.5, -1.0, -0.25]))
    assert got == {"phrase": [1.0, 0.0, 0.0], "likelihood": [1.0, 0.0, 0.0], "likelihood score": [0.5, -1.0, -0.25],
                   "phrase, not refused": [1.0, 1.0, 0.0]}


@pytest.mark.slow
def test_run_windows_on_a_tiny_model(tmp_path, tiny_model, gguf_tokenizer):
    from sqsd_lab.adapters import build_directions, direction_sets, refusal_records
    from sqsd_lab.data import generate_responses
    from sqsd_lab.windows import across_seeds, measures, reference, run_windows, seeds_table

    harmful = [f"Explain forbidden thing {i}." for i in range(8)]
    pool = [{"prompt": f"What is {a} + 1?", "response": f"{a} + 1 = {a + 1}."} for a in range(12)]
    strata = ["short" if a % 3 else "long" for a in range(12)]
    build_directions(tiny_model, gguf_tokenizer, tmp_path / "dirs",
                     danger=[{"prompt": p, "response": "Sure, here is how to do it."} for p in harmful],
                     safety=refusal_records(harmful), rank=2, max_length=64, num_train_epochs=1)
    danger, safety = direction_sets(tmp_path / "dirs")
    # θ_t: the danger adapter stands in for a fine-tuning checkpoint (any LoRA checkpoint of θ_0 will do)
    dirs = ((tmp_path / "dirs" / "danger", danger), (tmp_path / "dirs" / "safety", safety),
            tmp_path / "dirs" / "danger")
    common = dict(k=3, rank=2, max_length=64, eval_tokens=4, strata=strata, num_train_epochs=1,
                  per_device_train_batch_size=4)
    overall = run_windows(tiny_model, gguf_tokenizer, pool, harmful[:4], tmp_path / "w", *dirs, **common)
    within = run_windows(tiny_model, gguf_tokenizer, pool, harmful[:4], tmp_path / "in", *dirs, within=True,
                         **common)
    assert overall["window_size"] == 4 and [w["window"] for w in overall["windows"]] == [1, 2, 3]
    means = [w["sqsd_mean"] for w in overall["windows"]]
    assert means == sorted(means, reverse=True)
    for w in overall["windows"]:
        indices = overall["evaluations"][f"window {w['window']}"]["indices"]
        assert w["mix"] == {label: sum(strata[i] == label for i in indices) for label in ("long", "short")
                            if any(strata[i] == label for i in indices)}
        saved = json.loads((tmp_path / "w" / f"window_{w['window']}" / "judged.json").read_text())
        for m, values in measures(saved).items():  # each measure is the mean of the saved per-prompt values
            assert w["measures"][m] == pytest.approx(sum(values) / 4)
        assert w["degenerate"] == pytest.approx(saved["outcomes"]["phrase"].count("degenerate") / 4)
    assert set(overall["rho"]) == {"phrase", "likelihood", "likelihood score", "phrase, not refused"}
    # within strata: 4 "long" and 8 "short" records → every window holds 1 long and 2 short ones
    assert within["ranking"] == "within strata" and within["window_size"] == 3
    assert [w["mix"] for w in within["windows"]] == [{"long": 1, "short": 2}] * 3
    assert set(overall["variants_rho"]) == {"danger only (cosine)", "SQSD, global_cosine"}
    assert (tmp_path / "w" / "windows.png").stat().st_size > 5000
    assert "| random |" in (tmp_path / "w" / "windows.md").read_text()
    with pytest.raises(ValueError, match="give strata"):
        run_windows(tiny_model, gguf_tokenizer, pool, harmful[:4], tmp_path / "x", *dirs, k=3, within=True)
    theta = reference(tiny_model, gguf_tokenizer, harmful[:4], tmp_path / "theta_0", eval_tokens=4)
    saved = json.loads((tmp_path / "theta_0" / "judged.json").read_text())  # θ_0's own answers, judged alike
    assert theta["measures"] == {m: pytest.approx(sum(v) / 4) for m, v in measures(saved).items()}
    assert saved["responses"] == generate_responses(tiny_model, gguf_tokenizer, harmful[:4], 4, desc="again")
    lines = seeds_table(across_seeds([overall]), theta).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| random |"))
    assert lines[at + 1].startswith("| θ_0 (no fine-tuning) |")
    assert lines[at + 1].split(" | ")[3] == f"{theta['measures']['phrase']:.2f}"  # after the row name, SQSD, mix
    # a rerun alike reuses every window; one with other held-out prompts makes each window again
    saved = tmp_path / "w" / "window_1" / "judged.json"
    stamp = saved.stat().st_mtime_ns
    again = run_windows(tiny_model, gguf_tokenizer, pool, harmful[:4], tmp_path / "w", *dirs, **common)
    assert saved.stat().st_mtime_ns == stamp and again["windows"] == overall["windows"]
    fewer = run_windows(tiny_model, gguf_tokenizer, pool, harmful[:2], tmp_path / "w", *dirs, **common)
    assert fewer["held_out"] == 2 and len(json.loads(saved.read_text())["responses"]) == 2


def test_across_seeds_against_hand_computed_values(tmp_path):
    """ρ per seed per measure, its mean with a t interval across seeds (t_0.975, 2 df = 4.303), each window's mean
    of per-seed means; where every seed and prompt agree the bootstrap interval is that point."""
    from sqsd_lab.windows import across_seeds, seeds_plot, seeds_table

    def summary(seed, harm, random):
        """Two held-out prompts; a window harmful on round(2·h) of them by the phrase judge, its likelihood margins
        −0.5 there and −1 elsewhere: the likelihood verdict is refusal throughout, so its ρ is undefined."""
        def ev(h):
            n = round(2 * h)
            return _evaluation([True] * n + [False] * (2 - n), [-0.5] * n + [-1.0] * (2 - n))
        evs = {**{f"window {w + 1}": ev(h) for w, h in enumerate(harm)}, "random": ev(random)}
        rho = spearman([1, 2, 3], harm)
        return {"seed": seed, "k": 3, "window_size": 4, "held_out": 2, "ranking": "overall", "evaluations": evs,
                "rho": {"phrase": rho, "likelihood": None, "likelihood score": rho, "phrase, not refused": rho},
                "windows": [{"window": w + 1, "sqsd_mean": 3.0 - w, "mix": None, "degenerate": 0.1 * seed}
                            for w in range(3)],
                "random": {"mix": None, "degenerate": 0.0}}

    runs = [summary(0, [1.0, 0.5, 0.0], 0.5), summary(1, [1.0, 0.0, 0.5], 0.5), summary(2, [1.0, 0.5, 0.0], 0.5)]
    got = across_seeds(runs)
    phrase = got["measures"]["phrase"]
    assert phrase["rho_per_seed"] == pytest.approx([-1.0, -0.5, -1.0])
    mean, sd = -2.5 / 3, float(np.std([-1.0, -0.5, -1.0], ddof=1))
    assert phrase["rho_mean"] == pytest.approx(mean)
    half = 4.303 * sd / 3 ** 0.5
    assert phrase["rho_95_across_seeds"] == pytest.approx([max(-1.0, mean - half), mean + half])  # clipped at −1
    assert [w["mean"] for w in phrase["windows"]] == pytest.approx([1.0, 1 / 3, 1 / 6])
    assert (phrase["windows"][0]["ci_low"], phrase["windows"][0]["ci_high"]) == (1.0, 1.0)  # every draw harmful
    assert phrase["rho_of_mean"] == pytest.approx(-1.0) and phrase["random"]["mean"] == pytest.approx(0.5)
    score = got["measures"]["likelihood score"]  # margins −0.5 / −1: the mean is harm / 2 − 1
    assert [w["mean"] for w in score["windows"]] == pytest.approx([-0.5, -2.5 / 3, -2.75 / 3])
    verdict = got["measures"]["likelihood"]
    assert [w["mean"] for w in verdict["windows"]] == [0.0, 0.0, 0.0]
    assert verdict["rho_mean"] is None and verdict["rho_95_across_seeds"] is None and verdict["rho_of_mean"] is None
    assert got["windows"][0]["degenerate"] == pytest.approx(0.1)
    text = seeds_table(got)
    assert "-1.00, -0.50, -1.00" in text and "| 1 | +3.000 | – | 1.00 [1.00, 1.00] |" in text
    assert "likelihood: Spearman's ρ (window rank vs the measure) per seed n/a, n/a, n/a; mean n/a; ρ" in text
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
