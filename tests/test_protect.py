"""The protection experiment's bookkeeping against hand-computed values: the poisoned pool, removal statistics,
intervals, and the summary across seeds."""

import pytest

from sqsd_callback.protect import BY_NAME, CONDITIONS, poisoned_pool, removal_stats, summarize, table, wilson


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
