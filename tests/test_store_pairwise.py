"""Blind pairwise review in the store (annotation_db/pairwise.py) on SQLite and PostgreSQL: cases queued
once per batch, A/B order seeded per case and rater, never one's own or an already judged case,
append-only preferences mapped back to versions, a summary per (candidate, active), DPO pairs, erasure.

    python -m pytest -q tests/test_store_pairwise.py
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from annotation_db import Conflict, InvalidInput, NotFound, store
from annotation_db import pairwise as pw
from annotation_db.erase import erase_conversation
from annotation_db.models import PairwiseCase, PairwisePreference, Side

from conftest import h


@pytest.fixture
def duel(world):
    """`world` plus a candidate v2, an expert's own conversation, and a batch of four cases: t1 and t2
    (the clinician's), the expert-1's own turn, and a held-out example (no turn)."""
    w, db = world, world["db"]
    with db.session() as s:
        v2 = store.register_version(s, base_model="b", adapter_path="models/v2", parent_id=w["v1"])
        own = store.start_conversation(s, w["e1"], {"age": 30})
        t_own = store.record_turn(s, own.id, "My own case?", "Own answer.", template="qa-v1", model_version_id=w["v1"])
        cases = [
            pw.CaseIn("What is this lesion?", "Melanoma; refer.", "A seborrhoeic keratosis.", [h(0), h(1)],
                      {"age": 54}, "qa-v1", turn_id=w["t1"]),
            pw.CaseIn("And this one?", "A nevus.", "A nevus.", [h(2)], None, "qa-v1", turn_id=w["t2"]),
            pw.CaseIn("My own case?", "Candidate own.", "Own answer.", [], None, "qa-v1", turn_id=t_own.id),
            pw.CaseIn("Held-out: what is it?", "Psoriasis.", "Eczema.", [h(2)], {"site": "elbow"}),
        ]
        q = pw.add_pairwise_cases(s, cases, candidate="v2", active=w["v1"], batch="refine-r1")
    return dict(w, v2=v2.id, own_turn=t_own.id, own_conv=own.id, cases=q.case_ids, case_in=cases)


def test_queueing_is_idempotent_per_batch_and_checks_its_input(duel):
    w, db = duel, duel["db"]
    assert len(w["cases"]) == 4
    with db.session() as s:
        again = pw.add_pairwise_cases(s, w["case_in"], candidate=w["v2"], active="v1", batch="refine-r1")
        assert (again.added, again.existing, again.case_ids) == (0, 4, w["cases"])
        other = pw.add_pairwise_cases(s, w["case_in"][3:], candidate=w["v2"], active="v1", batch="on-demand")
        assert other.added == 1 and other.case_ids[0] not in w["cases"]
        with pytest.raises(Conflict, match="other versions"):
            pw.add_pairwise_cases(s, w["case_in"][:1], candidate="v1", active=w["v2"], batch="refine-r1")
        with pytest.raises(InvalidInput, match="itself"):
            pw.add_pairwise_cases(s, [], candidate="v2", active="v2", batch="x")
        with pytest.raises(NotFound, match="v9"):
            pw.add_pairwise_cases(s, [], candidate="v9", active="v1", batch="x")
        with pytest.raises(InvalidInput, match="image hash"):
            pw.add_pairwise_cases(s, [pw.CaseIn("q?", "a", "b", ["not-a-hash"])], candidate="v2", active="v1", batch="x")
        with pytest.raises(InvalidInput, match="question"):
            pw.add_pairwise_cases(s, [pw.CaseIn("  ", "a", "b")], candidate="v2", active="v1", batch="x")


def test_order_is_seeded_per_case_and_rater():
    orders = {(c, r): pw.shown_first(c, r) for c in range(1, 201) for r in (1, 2)}
    assert orders == {(c, r): pw.shown_first(c, r) for c in range(1, 201) for r in (1, 2)}  # the same every time
    firsts = [orders[(c, 1)] for c in range(1, 201)]
    assert 70 < firsts.count(Side.candidate) < 130  # about half each way (a fixed draw: 200 fair coin flips)
    assert sum(orders[(c, 1)] != orders[(c, 2)] for c in range(1, 201)) > 60  # raters see different orders


def test_next_pair_hides_versions_skips_own_and_judged_cases(duel):
    w, db = duel, duel["db"]
    with db.session() as s:
        offered = []
        skip: list[int] = []
        while (pair := pw.next_pair(s, w["e1"], skip=skip)) is not None:
            offered.append(pair.case_id)
            skip.append(pair.case_id)
        own_case = w["cases"][2]
        assert offered == [w["cases"][0], w["cases"][1], w["cases"][3]]  # never expert-1's own question
        assert pw.pairs_left(s, w["e1"]) == 3 and pw.pairs_left(s, w["e1"], include_own=True) == 4
        assert pw.next_pair(s, w["e1"], include_own=True, skip=skip).case_id == own_case
        pair = pw.next_pair(s, w["e1"])
        first = pw.shown_first(pair.case_id, w["e1"])
        expected = ("Melanoma; refer.", "A seborrhoeic keratosis.")
        assert (pair.answer_a, pair.answer_b) == (expected if first is Side.candidate else expected[::-1])
        assert pair.image_hashes == [h(0), h(1)] and pair.context == {"age": 54}
        assert not any(v in repr(pair) for v in ("v1", "v2", "candidate", "active"))  # blind: no version names
        done = pw.record_preference(s, pair.case_id, w["e1"], "A")
        assert done.version_a == ("v2" if first is Side.candidate else "v1")
        assert done.winner == ("candidate" if first is Side.candidate else "active")
        assert "A was **" in done.message
        assert pw.next_pair(s, w["e1"]).case_id == w["cases"][1]  # judged: never offered again
        assert pw.next_pair(s, w["e2"]).case_id == w["cases"][1]  # one rater per case by default: it has one
        assert pw.next_pair(s, w["e2"], need=2, batch="refine-r1").case_id == w["cases"][0]  # two wanted: still open
        assert pw.next_pair(s, w["e2"], batch="on-demand") is None
        assert pw.pairs_left(s, w["e2"]) == 3 and pw.pairs_left(s, w["e2"], need=2) == 4  # e1's own case is e2's to judge
        with pytest.raises(InvalidInput, match="own question"):
            pw.record_preference(s, own_case, w["e1"], "b")
        assert pw.record_preference(s, own_case, w["e1"], "b", include_own=True).choice == "b"


def test_only_experts_judge_and_choices_are_checked(duel):
    w, db = duel, duel["db"]
    with db.session() as s:
        with pytest.raises(InvalidInput, match="only experts"):
            pw.next_pair(s, w["doc"])
        with pytest.raises(InvalidInput, match="only experts"):
            pw.record_preference(s, w["cases"][0], w["doc"], "a")
        with pytest.raises(InvalidInput, match="'a', 'b' or 'tie'"):
            pw.record_preference(s, w["cases"][0], w["e1"], "left")
        with pytest.raises(NotFound):
            pw.record_preference(s, 9999, w["e1"], "a")
        with pytest.raises(InvalidInput, match="correction"):
            pw.record_preference(s, w["cases"][0], w["e1"], "a", correction="   ")


def _vote(s, case_id, rater, winner: str, **kw):
    """Record that `rater` preferred `winner` (candidate / active / tie), whatever side it was shown on."""
    if winner == "tie":
        return pw.record_preference(s, case_id, rater, "tie", **kw)
    first = pw.shown_first(case_id, rater).value
    return pw.record_preference(s, case_id, rater, "a" if first == winner else "b", **kw)


def test_summary_counts_the_latest_preference_of_each_rater(duel):
    w, db = duel, duel["db"]
    c1, c2, _own, c4 = w["cases"]
    with db.session() as s:
        assert [(x.candidate, x.active, x.judgements, x.cases) for x in pw.pairwise_summary(s)] == [("v2", "v1", 0, 4)]
        e3 = store.get_or_create_user(s, "expert-3").id
        _vote(s, c1, w["e1"], "active")
        _vote(s, c1, w["e1"], "candidate")  # changed their mind: the latest counts
        _vote(s, c1, w["e2"], "candidate")
        _vote(s, c4, w["e1"], "active")
        _vote(s, c2, e3, "tie")
        x = pw.pairwise_summary(s, batch="refine-r1")[0]
        assert (x.wins, x.losses, x.ties, x.judgements, x.judged_cases, x.raters, x.cases) == (2, 1, 1, 4, 3, 3, 4)
        assert x.candidate_version_id == w["v2"] and x.active_version_id == w["v1"]
        assert pw.pairwise_summary(s, candidate="v2", active="v1") == [x]
        assert pw.pairwise_summary(s, batch="nothing") == []
        assert pw.pairwise_summary(s, candidate="v1") == []
        pref = s.get(PairwisePreference, _vote(s, c4, w["e2"], "candidate").preference_id)
        assert pref.preferred_version_id == w["v2"] and pref.winner.value == "candidate"
        assert pref.shown_first is pw.shown_first(c4, w["e2"])


def test_preferences_become_dpo_pairs(duel):
    w, db = duel, duel["db"]
    c1, c2, _own, c4 = w["cases"]
    with db.session() as s:
        _vote(s, c1, w["e1"], "active", correction="Seborrhoeic keratosis; no treatment needed.")
        _vote(s, c2, w["e1"], "tie", correction="A nevus.")  # the same as both answers: nothing to learn
        _vote(s, c4, w["e1"], "candidate")
        _vote(s, c4, w["e2"], "tie")  # a tie without a correction says nothing about which is better
        pairs = pw.pairwise_preference_pairs(s)
        got = [(p.case_id, p.source, p.chosen, p.rejected, p.chosen_version_id, p.rejected_version_id) for p in pairs]
        fix = "Seborrhoeic keratosis; no treatment needed."
        assert got == [
            (c1, "correction", fix, "Melanoma; refer.", None, w["v2"]),
            (c1, "correction", fix, "A seborrhoeic keratosis.", None, w["v1"]),
            (c4, "preference", "Psoriasis.", "Eczema.", w["v2"], w["v1"]),
        ]
        assert pairs[0].image_hashes == [h(0), h(1)] and pairs[0].template == "qa-v1" and pairs[0].turn_id == w["t1"]
        assert [p.case_id for p in pw.pairwise_preference_pairs(s, corrections_only=True)] == [c1, c1]


def test_erasure_blanks_pairwise_copies_and_they_are_skipped(duel):
    w, db = duel, duel["db"]
    c1, c2, _own, c4 = w["cases"]
    with db.session() as s:
        admin = store.get_or_create_user(s, "ada", "admin")
        _vote(s, c1, w["e2"], "candidate", correction="Melanoma in situ; excise.", comment="patient from Leeds")
        _vote(s, c4, w["e2"], "candidate")
    erase_conversation(db, w["conv"], by=admin.name, reason="consent withdrawn", images_dir=None)
    with db.session() as s:
        for cid in (c1, c2):
            case = s.get(PairwiseCase, cid)
            assert case.erased_at is not None and (case.question, case.candidate_answer, case.image_hashes) == ("", "", [])
        assert s.get(PairwiseCase, c4).erased_at is not None  # it showed image 2, deleted with the conversation
        pref = s.scalars(select(PairwisePreference).where(PairwisePreference.case_id == c1)).one()
        assert pref.correction is None and pref.comment is None
        assert pw.next_pair(s, w["e2"]).case_id == w["cases"][2]  # only expert-1's own case is left
        x = pw.pairwise_summary(s)[0]
        assert (x.judgements, x.cases) == (0, 1)
        assert pw.pairwise_preference_pairs(s) == []
        with pytest.raises(Conflict, match="erased"):
            pw.record_preference(s, c1, w["e1"], "a")
        q = pw.add_pairwise_cases(s, w["case_in"][:1], candidate="v2", active="v1", batch="later")
        assert (q.added, q.skipped_erased) == (0, 1)


def test_downgrade_refuses_to_lose_preferences(url):
    from annotation_db import Store
    from annotation_db.db import current_revision, downgrade, upgrade

    st = Store.open(url)
    with st.session() as s:
        e = store.get_or_create_user(s, "e", "expert")
        v1 = store.ensure_base_version(s, "base")
        v2 = store.register_version(s, base_model="base", adapter_path="m/v2")
        q = pw.add_pairwise_cases(s, [pw.CaseIn("q?", "a.", "b.")], candidate=v2.id, active=v1.id, batch="b")
    downgrade(url, "0003")  # queued cases alone may go
    assert current_revision(url) == "0003"
    upgrade(url)
    with st.session() as s:
        q = pw.add_pairwise_cases(s, [pw.CaseIn("q?", "a.", "b.")], candidate="v2", active="v1", batch="b")
        pw.record_preference(s, q.case_ids[0], e.id, "tie")
    with pytest.raises(RuntimeError, match="pairwise preference"):
        downgrade(url, "0003")
    assert current_revision(url) in ("0004", "0006")  # SQLite keeps the steps done before the refusal; PostgreSQL rolls back
    upgrade(url)
    with st.session() as s:  # a run that learned from that judgement: its lineage is kept as well
        run = store.start_training_run(s, {"method": "dpo"})
        pref = s.scalar(select(PairwisePreference.id))
        store.finish_training_run(s, run.id, status="completed", preference_ids=[pref])
    with pytest.raises(RuntimeError, match="lineage of 1 trained preference"):
        downgrade(url, "0005")
    assert current_revision(url) == "0006"
    st.dispose()
