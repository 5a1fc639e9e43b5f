"""The promotion gate on real scores: answers scored by the diagnosis matcher, decided by paired intervals.

Each case builds the active version's and a candidate's answers to the same held-out
cases, scores both with `score_predictions` (no model) and asks `decide`.
"""

from __future__ import annotations

import pytest

from training.data.examples import Example
from training.eval.evaluate import score_predictions
from training.eval.gate import decide, no_heldout_decision

LABELS = ["melanoma", "psoriasis", "basal cell carcinoma", "eczema"]
SHOTGUN = "Differential: melanoma, psoriasis, basal cell carcinoma, eczema, naevus or seborrhoeic keratosis."


def cases(n, *, source="expert", skin=lambda i: "II", start=0):
    return [Example(f"c{start + i}", [f"/img/{start + i}.png"], "What is this?", [f"Most likely {LABELS[i % 4]}."],
                    label=LABELS[i % 4], source=source, context={"fitzpatrick": skin(i)}, kind="diagnosis")
            for i in range(n)]


def right(ex):
    return f"Most likely {ex.label}; the border is irregular in case {ex.id}."


def wrong(ex):
    return f"Most likely {LABELS[(LABELS.index(ex.label) + 1) % 4]}; the border is irregular in case {ex.id}."


def reports(examples, candidate, active):
    score = lambda answers: score_predictions(answers, examples, metrics=("rouge", "diagnosis", "repetition"))  # noqa: E731
    return score([candidate(ex) for ex in examples]), score([active(ex) for ex in examples])


def active_mostly_right(ex):
    return right(ex) if int(ex.id[1:]) % 5 else wrong(ex)  # 80 %


def test_a_candidate_as_good_as_the_active_passes_with_its_interval():
    ex = cases(40)
    d = decide(*reports(ex, right, active_mostly_right), examples=ex)
    assert d.promote and not d.forced and d.primary == "diagnosis_accuracy (expert-labelled held-out cases)"
    assert d.n == 40 and d.candidate == 1.0 and d.active == 0.8 and d.ci[0] > 0
    assert "passed the gate: diagnosis accuracy: candidate 1.00 vs active 0.80 on 40 cases" in d.reason


@pytest.mark.parametrize("candidate, why", [
    (lambda ex: SHOTGUN, "shotgun differential"),
    (wrong, "wrong labels"),
    (lambda ex: f"This is not {ex.label}; it looks benign.", "negated label"),
    (lambda ex: f"{ex.label.capitalize()} has been ruled out.", "ruled out"),
])
def test_shotgun_wrong_and_negated_answers_are_rejected_naming_the_metric(candidate, why):
    ex = cases(40)
    d = decide(*reports(ex, candidate, active_mostly_right), examples=ex)
    assert not d.promote, why
    assert d.reason.startswith("rejected by the gate: diagnosis accuracy: candidate 0.00 vs active 0.80 on 40 cases"), d.reason
    assert "worse by more than 0.05" in d.reason


def test_the_experts_labels_decide_over_synthetic_ones():
    ex = cases(30) + cases(60, source="synthetic-qa", start=100)
    cand = lambda e: right(e) if e.source != "expert" else wrong(e)  # noqa: E731  good on synthetic, wrong on expert cases
    d = decide(*reports(ex, cand, active_mostly_right), examples=ex)
    assert not d.promote and "expert-labelled" in d.primary and d.n == 30
    few_experts = cases(10) + cases(60, source="synthetic-qa", start=100)
    d = decide(*reports(few_experts, cand, active_mostly_right), examples=few_experts)
    assert d.primary == "diagnosis_accuracy (labelled held-out cases (synthetic included))" and d.n == 70


def test_too_few_cases_are_said_and_only_force_promotes():
    ex = cases(12)
    d = decide(*reports(ex, right, active_mostly_right), examples=ex)
    assert not d.promote and "too few held-out cases to decide: 12 labelled held-out cases, at least 30 needed" in d.reason
    forced = decide(*reports(ex, right, active_mostly_right), examples=ex, force=True)
    assert forced.promote and forced.forced and forced.reason.startswith("forced promotion although: too few")
    assert not no_heldout_decision(False).promote and no_heldout_decision(True).forced


def test_a_subgroup_shown_worse_blocks_promotion():
    skin = lambda i: "I" if i < 40 else "V"  # noqa: E731
    ex = cases(80, skin=skin)
    active = lambda e: wrong(e) if skin(int(e.id[1:])) == "I" else right(e)  # noqa: E731
    cand = lambda e: right(e) if skin(int(e.id[1:])) == "I" else (right(e) if int(e.id[1:]) % 10 < 3 else wrong(e))  # noqa: E731
    d = decide(*reports(ex, cand, active), examples=ex)
    overall = d.checks[0]
    assert overall["status"] in ("better", "non_inferior") and overall["candidate"] - overall["active"] > 0.1  # +0.15 overall...
    assert not d.promote and "subgroup fitzpatrick=V: diagnosis accuracy: candidate 0.30 vs active 1.00 on 40 cases" in d.reason


def test_copying_a_training_answer_is_caught():
    ex = cases(40)
    copied = "Most likely melanoma, refer urgently to the pigmented lesion clinic."
    cand = lambda e: copied if e.label != "melanoma" else right(e)  # noqa: E731
    d = decide(*reports(ex, cand, active_mostly_right), examples=ex, training_targets=[copied, "Benign naevus."])
    assert not d.promote and "copying of training answers rose to 0.7500 (active 0.0000), above the limit 0.3" in d.reason


def test_the_new_corrections_must_be_learned():
    ex = cases(40)
    learned = cases(6, start=500)
    same = decide(*reports(ex, right, active_mostly_right), examples=ex,
                  in_sample=reports(learned, active_mostly_right, active_mostly_right))
    assert not same.promote and "did not learn the new corrections: ROUGE-L on 6 of them (in-sample)" in same.reason
    better = decide(*reports(ex, right, active_mostly_right), examples=ex, in_sample=reports(learned, right, wrong))
    assert better.promote and any(c["what"] == "new corrections, in-sample (6)" for c in better.checks)
