"""The protection experiment's bookkeeping against hand-computed values: the poisoned pool, removal statistics,
intervals, and the summary across seeds."""

import pytest

from sqsd_lab.protect import BY_NAME, CONDITIONS, poisoned_pool, removal_stats, summarize, table, wilson


def test_pool_has_the_share_of_harmful_examples():
    benign = [{"prompt": f"b{i}", "response": "ok"} for i in range(90)]
    harmful = [{"prompt": f"h{i}", "response": "sure"} for i in range(20)]
    pool = poisoned_pool(benign, harmful, 0.1)
    assert len(pool) == 100 and sum(r["harmful"] for r in pool) == 10  # 10 / 100 = p
    assert poisoned_pool(benign, harmful, 0.1) == pool  # a fixed order
    assert sum(r["harmful"] for r in poisoned_pool(benign, harmful, 0.0)) == 0
    with pytest.raises(ValueError, match="needs 60 of them, only 20"):
        poisoned_pool(benign, harmful, 0.4)


def test_removal_stats_hand_computed():
    pool = [{"harmful": h} for h in (True, True, False, False, False, True)]
    stats = removal_stats({0, 2, 5}, pool)  # 2 of 3 harmful found; 1 of 3 benign removed
    assert stats == {"removed": 3, "recall": pytest.approx(2 / 3), "precision": pytest.approx(2 / 3),
                     "benign_removed": pytest.approx(1 / 3)}
    assert removal_stats(set(), pool)["precision"] is None


def test_never_trained_counts_examples_dropped_every_time_they_came(tmp_path):
    """Hand-computed: of 2 harmful examples, one dropped in epoch 1 and trained in epoch 2 (dropped at least once,
    yet trained), the other dropped in both: 1 of 2 never trained. A random control's removed harmful example was
    never trained; a condition that removes nothing has no such share."""
    import json

    from sqsd_lab.protect import Experiment

    exp = Experiment.__new__(Experiment)
    exp.benign = [{"prompt": f"b{i}", "response": "ok"} for i in range(18)]
    exp.poison = [{"prompt": f"h{i}", "response": "sure"} for i in range(5)]
    exp.out = tmp_path
    pool = poisoned_pool(exp.benign, exp.poison, 0.1)
    first, second = [i for i, r in enumerate(pool) if r["harmful"]]
    scores = tmp_path / "p0.1" / BY_NAME["drop z-score > 2"].slug / "seed0" / "sqsd" / "scores.jsonl"
    scores.parent.mkdir(parents=True)
    rows = [{"index": i, "dropped": i == second or (i == first and epoch == 0)} for epoch in (0, 1)
            for i in range(len(pool))]
    scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = {"p": 0.1, "condition": "drop z-score > 2", "seed": 0, "removed_before": [],
              "dropped_online": [first, second], "removed": 2}
    assert exp.never_trained(result) == 0.5
    random = {"p": 0.1, "condition": "random as z-score", "seed": 0, "removed_before": [first, 3],
              "dropped_online": [], "removed": 2}
    assert exp.never_trained(random) == 0.5
    assert exp.never_trained({**result, "condition": "anchor", "dropped_online": [], "removed": 0}) is None


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0, 20)[0] == 0.0


def test_summary_and_table_across_seeds():
    runs = [{"p": 0.1, "condition": "no callback", "harmfulness": h, "utility": 0.5, "recall": None,
             "precision": None, "benign_removed": None, "removed": 0, "seconds": 10.0} for h in (0.4, 0.6)]
    (row,) = summarize(runs)
    assert row["seeds"] == 2 and row["harmfulness"]["mean"] == pytest.approx(0.5)
    assert row["harmfulness"]["min"] == 0.4 and row["recall"] is None
    assert "| 0.1 | no callback | 2 | 0.500 (0.400–0.600) |" in table([row])


def test_conditions_are_named_once_and_controls_point_at_removal_conditions():
    assert len(BY_NAME) == len(CONDITIONS)
    for c in CONDITIONS:
        if c.random_like is not None:
            other = BY_NAME[c.random_like]
            assert other.drops or other.offline_filter
