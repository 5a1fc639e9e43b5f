"""The store API on SQLite and PostgreSQL: every function, bad input, versions, lineage."""

from __future__ import annotations

import os
import socket

import pytest
from sqlalchemy import func, select

from annotation_db import Conflict, InvalidInput, LockHeld, NotFound, store
from annotation_db.models import Rating, Turn

from conftest import h


def test_users_and_images_are_idempotent(db):
    with db.session() as s:
        a = store.get_or_create_user(s, "ann", "admin")
        b = store.get_or_create_user(s, "ann", "expert")  # the auth config is the truth
        assert a.id == b.id and b.role.value == "expert"
        assert store.get_or_create_user(s, "ann").role.value == "expert"  # no role given: kept
        i1 = store.record_image(s, h(0), 10, 10)
        i2 = store.record_image(s, h(0), 10, 10)
        assert i1.id == i2.id
        with pytest.raises(InvalidInput):
            store.get_or_create_user(s, "x", "surgeon")
        with pytest.raises(InvalidInput):
            store.record_image(s, "../etc/passwd", 1, 1)
        with pytest.raises(InvalidInput):
            store.record_image(s, h(1), 0, 10)


def test_turns_history_and_image_links(world):
    with world["db"].session() as s:
        hist = store.conversation_history(s, world["conv"])
        assert [t.seq for t in hist] == [0, 1]
        assert hist[0].image_hashes == [h(0), h(1)] and hist[1].image_hashes == [h(2)]
        turn = s.get(Turn, world["t1"])
        assert turn.settings == {"max_new_tokens": 64} and turn.latency_s == 1.5 and turn.prompt_tokens == 90
        with pytest.raises(NotFound):
            store.conversation_history(s, 999)
        with pytest.raises(NotFound):
            store.record_turn(s, 999, "q", "a", image_hashes=[], template="t", settings={}, model_version_id=None)
        with pytest.raises(NotFound):
            store.record_turn(s, world["conv"], "q", "a", image_hashes=[h(9)], template="t", settings={},
                              model_version_id=None)
        with pytest.raises(InvalidInput):
            store.record_turn(s, world["conv"], "q", "a", image_hashes=[], template="t", settings={},
                              model_version_id=None, status="exploded")
        err = store.record_turn(s, world["conv"], "q", "", image_hashes=[], template="t", settings={},
                                model_version_id=None, status="error", error="CUDA OOM")
        assert err.status.value == "error" and err.seq == 2


def test_ratings_are_append_only_and_validated(world):
    with world["db"].session() as s:
        r1 = store.add_rating(s, world["t1"], world["e1"], 2, correction="A melanoma in situ.",
                              diagnosis="melanoma", flags=["wrong_diagnosis", "unsafe"], comment="biopsy")
        r2 = store.add_rating(s, world["t1"], world["e1"], 3, correction="A melanoma.")
        assert r1.model_version_id == world["v1"] and r1.flags == ["unsafe", "wrong_diagnosis"]
        eff = store.effective_ratings(s, world["t1"])
        assert [r.id for r in eff] == [r2.id]
        assert s.get(Turn, world["t1"]).expert_raters == 1
        thumbs = store.add_rating(s, world["t2"], world["doc"], 5, kind="thumbs")
        assert thumbs.kind.value == "thumbs"
    bad = [
        dict(score=0), dict(score=6), dict(score=3.5), dict(score=True),
        dict(score=3, correction="   \n\t "), dict(score=3, correction=""),
        dict(score=3, flags=["rude"]), dict(score=3, kind="stars"),
        dict(score=3, kind="thumbs"), dict(score=5, kind="thumbs", correction="x"),
        dict(score=3, diagnosis="d" * 201), dict(score=3, correction="a\x00b"),
    ]
    for kw in bad:
        with pytest.raises(InvalidInput):
            with world["db"].session() as s:
                store.add_rating(s, world["t1"], world["e2"], **kw)
    with pytest.raises(NotFound):
        with world["db"].session() as s:
            store.add_rating(s, 12345, world["e2"], 3)
    with pytest.raises(NotFound):
        with world["db"].session() as s:
            store.add_rating(s, world["t1"], 12345, 3)
    with world["db"].session() as s:
        assert s.scalar(select(func.count()).select_from(Rating)) == 3  # nothing half-written


@pytest.mark.parametrize("text", [
    "x" * 100_000,
    "'); DROP TABLE ratings; --",
    "<script>alert('x')</script><b>bold</b> &amp; \"quotes\"",
    "Ünïcödé — 皮膚 🩺 \r\n tabs\t and trailing space ",
])
def test_text_is_stored_verbatim(db, text):
    with db.session() as s:
        u = store.get_or_create_user(s, text[:200], "clinician")
        e = store.get_or_create_user(s, "expert")
        store.record_image(s, h(0), 2, 2)
        c = store.start_conversation(s, u.id, {"symptoms": text, "nested": [text]})
        t = store.record_turn(s, c.id, text, text, image_hashes=[h(0)], template=text[:200],
                              settings={"note": text}, model_version_id=None, error=text)
        r = store.add_rating(s, t.id, e.id, 4, correction=text[:store.MAX_CORRECTION_CHARS], diagnosis=text[:200],
                             comment=text[:store.MAX_COMMENT_CHARS])
        ids = (u.id, c.id, t.id, r.id)
    with db.session() as s:
        u, c, t, r = (s.get(m, i) for m, i in zip((store.User, store.Conversation, Turn, Rating), ids))
        assert u.name == text[:200] and c.context == {"symptoms": text, "nested": [text]}
        assert (t.question, t.answer, t.template, t.settings["note"], t.error) == (text, text, text[:200], text, text)
        assert (r.correction, r.diagnosis, r.comment) == (text[:store.MAX_CORRECTION_CHARS], text[:200],
                                                          text[:store.MAX_COMMENT_CHARS])
        item = store.review_queue(s, store.get_or_create_user(s, "other").id, need=2)[0]
        assert item.question == text and item.answer == text


def test_review_queue(world):
    db = world["db"]
    with db.session() as s:
        e1, e2, doc = world["e1"], world["e2"], world["doc"]
        items = store.review_queue(s, e1, limit=10)
        assert [i.turn_id for i in items] == [world["t1"], world["t2"]]  # oldest first
        assert items[0].image_hashes == [h(0), h(1)]
        assert items[1].image_hashes == [h(0), h(1), h(2)]  # the conversation up to that turn
        assert items[0].model_version == "v1" and items[0].context["site"] == "back"
        assert store.review_queue(s, doc, limit=10) == []  # never one's own turns
        assert store.review_queue_count(s, e1) == 2
        assert [i.turn_id for i in store.review_queue(s, e1, limit=1, offset=1)] == [world["t2"]]
        store.add_rating(s, world["t1"], e1, 4)
        assert [i.turn_id for i in store.review_queue(s, e1, limit=10)] == [world["t2"]]  # already rated
        assert [i.turn_id for i in store.review_queue(s, e2, limit=10)] == [world["t2"]]  # t1 has 1 review
        assert [i.turn_id for i in store.review_queue(s, e2, need=2, limit=10)] == [world["t1"], world["t2"]]
        store.add_rating(s, world["t2"], doc, 1, kind="thumbs")  # a thumb is not an expert review
        assert store.review_queue_count(s, e2) == 1
        v2 = store.register_version(s, base_model="b", adapter_path="models/v2")
        assert store.review_queue(s, e2, model_version_id=v2.id) == []
        with pytest.raises(InvalidInput):
            store.review_queue(s, e2, need=0)


def test_gold_pairs_resolution(world):
    db = world["db"]
    with db.session() as s:
        e1, e2 = world["e1"], world["e2"]
        e3 = store.get_or_create_user(s, "expert-3").id
        store.add_rating(s, world["t1"], e1, 2, correction="Melanoma; refer for excision.")
        store.add_rating(s, world["t1"], e2, 2, correction="Likely melanoma, biopsy.")  # conflict, newest wins
        store.add_rating(s, world["t2"], e1, 5)
        store.add_rating(s, world["t2"], e2, 4)
        store.add_rating(s, world["t2"], world["doc"], 1, kind="thumbs")  # ignored
        g = store.gold_pairs(s)
        by_turn = {p.turn_id: p for p in g.pairs}
        assert by_turn[world["t1"]].target == "Likely melanoma, biopsy." and by_turn[world["t1"]].source == "expert"
        assert by_turn[world["t2"]].target == "A nevus." and by_turn[world["t2"]].source == "accepted"
        assert by_turn[world["t2"]].image_hashes == [h(0), h(1), h(2)]
        assert by_turn[world["t1"]].context["age"] == 54 and by_turn[world["t1"]].template == "qa-v1"
        assert len(g.conflicts) == 1 and g.conflicts[0].turn_id == world["t1"]
        assert [(p.chosen, p.rejected) for p in g.preference_pairs] == [
            ("Likely melanoma, biopsy.", "A seborrhoeic keratosis.")]
        # the expert who re-rates changes the outcome: t2's mean falls below the threshold
        store.add_rating(s, world["t2"], e3, 1)
        store.add_rating(s, world["t2"], e1, 2)
        g = store.gold_pairs(s)
        assert [p.turn_id for p in g.pairs] == [world["t1"]] and g.left_out == [world["t2"]]
        assert store.gold_pairs(s, accept_threshold=2.0).pairs[-1].turn_id == world["t2"]


def test_versions_lifecycle(world):
    with world["db"].session() as s:
        assert store.active_version(s).name == "v1"
        assert store.ensure_base_version(s, "other").id == world["v1"]  # already one active
        v2 = store.register_version(s, base_model="b", adapter_path="models/v2", parent_id=world["v1"],
                                    metrics={"bleu": 3.1})
        assert v2.name == "v2" and v2.status.value == "candidate"
        store.promote(s, v2.id)
        assert store.active_version(s).id == v2.id and store.get_version(s, "v1").status.value == "retired"
        v3 = store.register_version(s, base_model="b", adapter_path="models/v3", parent_id=v2.id)
        store.reject(s, v3.id, "gate: diagnosis accuracy fell 4 points")
        with pytest.raises(Conflict):
            store.promote(s, v3.id)
        store.promote(s, v3.id, forced=True, reason="expert override")
        assert store.active_version(s).id == v3.id
        store.rollback(s, v2.id)
        v3_after = store.get_version(s, v3.id)
        assert store.active_version(s).id == v2.id and v3_after.status.value == "retired"
        assert v3_after.status_reason == "rolled back to v2"
        store.rollback(s, v3.id)  # a rollback can be rolled back
        assert store.active_version(s).id == v3.id
        store.rollback(s, v2.id)
        with pytest.raises(Conflict):
            store.retire(s, v2.id)
        with pytest.raises(Conflict):
            store.reject(s, v2.id, "no")
        store.retire(s, "v1")
        assert [v.name for v in store.list_versions(s)] == ["v1", "v2", "v3"]
        with pytest.raises(NotFound):
            store.get_version(s, "v99")
        with pytest.raises(InvalidInput):
            store.reject(s, v3.id, "  ")


def test_training_runs_and_lineage(world):
    with world["db"].session() as s:
        r1 = store.add_rating(s, world["t1"], world["e1"], 2, correction="Melanoma.")
        r2 = store.add_rating(s, world["t2"], world["e1"], 5)
        run = store.start_training_run(s, {"lr": 1e-4, "mode": "qa"})
        g = store.gold_pairs(s)
        store.finish_training_run(s, run.id, status="completed", counts={"expert": 1, "accepted": 1},
                                  rating_ids=g.rating_ids, synthetic_ids=["syn-1", "syn-2"],
                                  report={"gate": "pass"})
        v2 = store.register_version(s, base_model="b", adapter_path="m/v2", parent_id=world["v1"],
                                    training_run_id=run.id)
        assert [r.id for r in store.lineage(s, v2.id)] == [r1.id, r2.id]
        assert store.lineage(s, world["v1"]) == []
        assert store.gold_pairs(s, since_version_id=v2.id).pairs == []  # nothing new since v2
        r3 = store.add_rating(s, world["t1"], world["e2"], 1, correction="Melanoma, urgent referral.")
        new = store.gold_pairs(s, since_version_id=v2.id).pairs
        assert [p.turn_id for p in new] == [world["t1"]] and r3.id in new[0].rating_ids
        run2 = store.start_training_run(s, {})
        store.finish_training_run(s, run2.id, status="completed", counts={}, rating_ids=[r3.id],
                                  synthetic_ids=[], report={})
        v3 = store.register_version(s, base_model="b", parent_id=v2.id, training_run_id=run2.id)
        assert [r.id for r in store.lineage(s, v3.id)] == [r1.id, r2.id, r3.id]
        assert [r.id for r in store.lineage(s, v3.id, ancestors=False)] == [r3.id]
        with pytest.raises(Conflict):
            store.finish_training_run(s, run.id, status="failed", counts={}, rating_ids=[], synthetic_ids=[],
                                      report={})
        with pytest.raises(NotFound):
            run3 = store.start_training_run(s, {})
            store.finish_training_run(s, run3.id, status="completed", counts={}, rating_ids=[999999],
                                      synthetic_ids=[], report={})


def test_eval_split_is_frozen(db):
    hashes = [h(i) for i in range(200)]
    with db.session() as s:
        first = store.assign_split(s, hashes, holdout_fraction=0.2, seed=0)
        assert 20 <= sum(v == "heldout" for v in first.values()) <= 60
    with db.session() as s:
        again = store.assign_split(s, hashes + [h(500)], holdout_fraction=0.9, seed=7)  # never reassigned
        assert {k: again[k] for k in hashes} == first
        assert store.get_split(s, [h(0), h(999)]) == {h(0): first[h(0)]}


def test_refine_lock(db):
    host = socket.gethostname()
    with db.session() as s:
        store.acquire_lock(s, "refine", "cron", os.getpid(), host)
    with pytest.raises(LockHeld, match="held by cron"):
        with db.session() as s:
            store.acquire_lock(s, "refine", "manual", 1, host)
    with db.session() as s:
        assert store.release_lock(s, "refine", "manual") is False
        assert store.release_lock(s, "refine", "cron") is True
        dead = 2**22 + 12345  # above pid_max: no such process
        store.acquire_lock(s, "refine", "crashed", dead, host)
    with db.session() as s:  # a dead holder on this host is stale
        assert store.acquire_lock(s, "refine", "manual", os.getpid(), host).owner == "manual"
    with db.session() as s:  # a holder elsewhere is stale only when too old
        store.release_lock(s, "refine")
        store.acquire_lock(s, "refine", "remote", 1, "other-host")
    with pytest.raises(LockHeld):
        with db.session() as s:
            store.acquire_lock(s, "refine", "manual", os.getpid(), host)
    with db.session() as s:
        assert store.acquire_lock(s, "refine", "manual", os.getpid(), host, stale_after_s=0).owner == "manual"


def test_stats_and_agreement(world):
    with world["db"].session() as s:
        e3 = store.get_or_create_user(s, "expert-3").id
        store.add_rating(s, world["t1"], world["e1"], 2, correction="Melanoma.", diagnosis="melanoma",
                         flags=["unsafe"])
        store.add_rating(s, world["t1"], world["e2"], 1, correction="Melanoma!", diagnosis="Melanoma ")
        store.add_rating(s, world["t2"], world["e1"], 5, diagnosis="nevus")
        store.add_rating(s, world["t2"], world["e2"], 4, diagnosis="lentigo", flags=["hallucination"])
        store.add_rating(s, world["t2"], e3, 5)
        df = store.stats_by_version(s)
        row = df[df["version"] == "v1"].iloc[0]
        assert row["answers"] == 2 and row["ratings"] == 5
        assert row["mean_score"] == pytest.approx(17 / 5)
        assert row["share_corrected"] == pytest.approx(2 / 5) and row["share_unsafe"] == pytest.approx(1 / 5)
        over = store.stats_over_time(s, "D")
        assert list(over["ratings"]) == [5]
        a = store.agreement(s)
        assert a["units"] == 2 and a["raters"] == 3
        assert a["score_alpha"] is not None and a["score_alpha"] > 0.5
        assert a["diagnosis_agreement"] == pytest.approx(0.5)  # melanoma==Melanoma, nevus!=lentigo
        assert 0.8 < a["correction_similarity"] < 1.0 and a["correction_pairs"] == 1
