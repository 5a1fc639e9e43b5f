"""Gate statistics: paired bootstrap intervals and decisions, Wilson win rates, copying."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from training.eval.stats import (
    MIN_PAIRED_N,
    Status,
    cases_needed,
    compare_paired,
    copy_rate,
    wilson_interval,
    win_rate,
    win_rate_from,
)


def _binary(n, p, seed):
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_clearly_better_candidate_interval_above_zero():
    active = _binary(200, 0.5, 1)
    cand = active.copy()
    flip = np.flatnonzero(active == 0)[:40]  # the candidate fixes 40 of the active's misses, breaks none
    cand[flip] = 1
    c = compare_paired(cand, active, metric="diagnosis_accuracy", tolerance=0.05, seed=0)
    assert c.status is Status.BETTER and c.ci_low > 0 and c.difference == pytest.approx(0.2)
    assert c.ci_low < 0.2 < c.ci_high
    assert "better" in c.summary() and "on 200 cases" in c.summary()


def test_equivalent_candidate_interval_crosses_zero_and_is_non_inferior():
    active = _binary(400, 0.6, 3)
    cand = active.copy()
    cand[np.flatnonzero(active == 1)[:10]] = 0  # 20 discordant cases, 10 each way: exactly no difference
    cand[np.flatnonzero(active == 0)[:10]] = 1
    c = compare_paired(cand, active, metric="diagnosis_accuracy", tolerance=0.05, seed=0)
    assert c.difference == 0 and c.ci_low < 0 < c.ci_high
    assert c.ci_low > -0.05 and c.status is Status.NON_INFERIOR and c.promotes
    line = c.summary()
    assert line.startswith("diagnosis accuracy: candidate ") and "(95% CI " in line and line.endswith("not worse by more than 0.05")


def test_clearly_worse_candidate_is_worse_and_shown_worse():
    active = np.ones(100)
    cand = np.ones(100)
    cand[:30] = 0  # loses 30 of 100
    cand[30:35] = 1
    c = compare_paired(cand, active, metric="rougeL", tolerance=0.05, seed=0)
    assert c.status is Status.WORSE and c.ci_high < -0.05 and c.shown_worse and not c.promotes
    assert "worse by more than 0.05" in c.summary() and "may be" not in c.summary()


def test_inconclusive_small_sample_is_worse_but_not_shown_worse():
    active = _binary(40, 0.5, 5)
    cand = _binary(40, 0.5, 6)  # independent answers: a very wide interval around zero
    c = compare_paired(cand, active, tolerance=0.05, seed=0)
    assert c.ci_low < -0.05 and c.ci_high > -0.05
    assert c.status is Status.WORSE and not c.shown_worse and "may be worse" in c.summary()


def test_lower_is_better_metrics_flip_the_decision():
    active = np.full(60, 0.30)
    active[::2] = 0.40
    cand = active - 0.10  # less repetition: better
    c = compare_paired(cand, active, metric="repetition_rate", higher_is_better=False, seed=0)
    assert c.difference == pytest.approx(-0.10) and c.status is Status.BETTER  # constant shift: the interval is the point
    assert c.ci_low == pytest.approx(-0.10) and c.ci_high == pytest.approx(-0.10)
    worse = compare_paired(active + 0.2, active, metric="repetition_rate", higher_is_better=False, seed=0)
    assert worse.status is Status.WORSE and "lower is better" in worse.summary()


def test_seeded_reproducibility_and_seed_matters():
    active = _binary(80, 0.55, 7)
    cand = _binary(80, 0.6, 8)
    a = compare_paired(cand, active, seed=11)
    b = compare_paired(cand, active, seed=11)
    other = compare_paired(cand, active, seed=12)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high) != (other.ci_low, other.ci_high)


def test_too_few_cases_no_decision_and_none_pairs_dropped():
    cand = [1, 0, 1, None, 1] * 5
    active = [1, 1, None, 0, 1] * 5
    c = compare_paired(cand, active, metric="diagnosis_accuracy")
    assert c.n == 15 and c.n < MIN_PAIRED_N and c.status is Status.TOO_FEW and c.ci_low is None and not c.promotes
    assert "too few cases to decide" in c.summary() and f"at least {MIN_PAIRED_N}" in c.summary()
    empty = compare_paired([None], [1.0])
    assert empty.n == 0 and empty.status is Status.TOO_FEW and "no case" in empty.summary()
    assert compare_paired([1.0] * 5, [0.0] * 5, min_n=5).status is Status.BETTER  # the minimum is configurable


def test_cases_needed_matches_the_power_argument():
    assert cases_needed(0.45, 0.05) == math.ceil(((1.959964 + 0.841621) * 0.45 / 0.05) ** 2)  # ~636
    assert cases_needed(0.45, 0.10) < cases_needed(0.45, 0.05)


def test_wilson_against_hand_computed_value_and_scipy():
    low, high = wilson_interval(8, 10)  # p=0.8, z=1.96: centre 0.7167, half-width 0.2266
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    ref = binomtest(13, 40).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(13, 40) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_win_rate_ties_excluded_or_half():
    w = win_rate(8, 2, ties=5)
    assert w.ties_as == "excluded" and w.rate == pytest.approx(0.8) and w.n == 10
    assert (w.ci_low, w.ci_high) == pytest.approx(wilson_interval(8, 10))
    half = win_rate(8, 2, ties=5, ties_as="half")
    assert half.rate == pytest.approx(10.5 / 15) and half.n == 15
    assert "ties excluded" in w.summary() and "Wilson CI 0.49 to 0.94" in w.summary()
    assert win_rate(0, 0, ties=3).rate is None
    assert win_rate_from(["candidate", "tie", "active", "candidate"]).rate == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown preference"):
        win_rate_from(["A"])


def test_copy_rate_flags_near_identical_training_answers():
    train = ["This is most likely eczema, apply emollients twice daily.", "Psoriasis plaques; start a topical steroid.",
             "A pearly papule with telangiectasia: basal cell carcinoma."]
    answers = ["This is most likely eczema; apply emollients twice daily!", "this is most likely eczema apply emollients twice daily",
               "Scaly plaques on the elbows, likely psoriasis; review in four weeks.", ""]
    r = copy_rate(answers, train, threshold=90)
    assert r.copied == (True, True, False, None) and r.n == 3 and r.rate == pytest.approx(2 / 3)
    assert r.most_copied_count == 2 and r.most_copied_target == train[0] and r.nearest[0] == 0
    assert "0.67 of 3 held-out answers" in r.summary()
    # an answer that is also its own reference is a correct templated answer, not a copy
    own = copy_rate(answers[:1], train, references=[["This is most likely eczema, apply emollients twice daily."]])
    assert own.copied == (False,) and own.rate == 0.0
    assert copy_rate(answers[:1], [], threshold=90).copied == (False,)
