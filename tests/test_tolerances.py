"""The tests' own yardsticks (sqsd_lab.tiny): ``rel_err`` pairs values one to one, and ``score_err`` judges a
score formed from others (sqsd = danger − safety, danger and safety as means over sets) against its terms."""

import pytest

from sqsd_lab.tiny import rel_err, score_err, score_scale


def _rows(danger, safety):
    """Score rows as the engines write them: one danger and one safety set, sqsd = danger − safety."""
    return [{"danger": d, "safety": s, "sqsd": d - s, "danger/d1": d, "safety/s1": s} for d, s in zip(danger, safety)]


def test_rel_err_refuses_lists_of_different_lengths():
    with pytest.raises(ValueError, match=r"rel_err: 2 values against 3 reference values"):
        rel_err([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"3 values against 2"):
        rel_err([1.0, 2.0, 5.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        score_err(_rows([0.1], [0.2]), _rows([0.1, 0.3], [0.2, 0.1]), "sqsd")
    with pytest.raises(AssertionError):
        rel_err([None, 1.0], [0.5, 1.0])  # None pairs only with None
    assert rel_err([None, 1.0], [None, 1.0]) == 0.0


def test_a_difference_is_judged_against_its_terms():
    """CI's numbers on another CPU: danger and safety within 1.3e-6 and 8.6e-7 of the loop, their difference
    1.8e-5 of its own max |·| since it cancels to a tenth of the terms; against the terms it is within 1.3e-6."""
    d, s = 0.100, 0.0885
    want = _rows([d, -0.060, 0.080], [s, -0.070, 0.075])
    got = _rows([d * (1 + 1.3e-6), -0.060, 0.080], [s * (1 - 8.6e-7), -0.070, 0.075])
    assert score_err(got, want, "danger") == pytest.approx(1.3e-6, rel=1e-6)
    assert score_err(got, want, "safety") == pytest.approx(8.6e-7, rel=1e-6)
    old = rel_err([r["sqsd"] for r in got], [r["sqsd"] for r in want])  # the old rule: against max |sqsd| = d − s
    assert old == pytest.approx(1.8e-5, rel=1e-2) and old > 1e-5
    assert score_scale(want, "sqsd") == pytest.approx(d + s)
    assert score_err(got, want, "sqsd") == pytest.approx((1.3e-6 * d + 8.6e-7 * s) / (d + s), rel=1e-6)
    assert score_err(got, want, "sqsd") < 1.3e-6

    bad = [dict(r) for r in want]  # sqsd off by 5e-5 of its terms, danger and safety exact
    bad[0]["sqsd"] += 5e-5 * (d + s)
    assert score_err(bad, want, "sqsd") == pytest.approx(5e-5, rel=1e-6)
    assert score_err(bad, want, "sqsd") > 1e-5  # fails the fp32 tolerance
    assert score_err(bad, want, "danger") == score_err(bad, want, "safety") == 0.0


def test_a_kind_is_judged_against_its_sets():
    """danger, the mean of two sets that cancel, against the mean of the sets' magnitudes; a set's own score
    against its own max |·|; rows without set keys fall back to the key's own max |·|."""
    want = [{"danger": (0.2 - 0.19) / 2, "danger/a": 0.2, "danger/b": -0.19, "safety": None, "sqsd": 0.005}]
    assert score_scale(want, "danger") == pytest.approx((0.2 + 0.19) / 2)
    assert score_scale(want, "danger/b") == pytest.approx(0.19)
    assert score_scale(want, "sqsd") == pytest.approx((0.2 + 0.19) / 2)  # no safety set: 0 for that kind
    assert score_scale([{"sqsd": -0.3}, {"sqsd": 0.1}], "sqsd") == pytest.approx(0.3)
