"""Erasure of a conversation (annotation_db/erase.py) on SQLite and PostgreSQL: content gone in one
transaction, a tombstone with who/when/why and the versions to retrain, ids and lineage kept, exports,
statistics, the review queue and gold pairs skip it, image files deleted after the commit only when
no other conversation uses them.

    python -m pytest -q tests/test_store_erase.py
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from annotation_db import Conflict, InvalidInput, NotFound, store
from annotation_db.erase import erase_conversation
from annotation_db.export import frames

from conftest import h


@pytest.fixture
def erasable(world, tmp_path):
    """`world` plus: ratings with corrections on both turns, a run v2 trained on one of them, a
    child version v3 continuing v2, a second conversation sharing image 2, image files on disk."""
    db = world["db"]
    images = tmp_path / "images"
    for i in range(4):
        p = images / h(i)[:2] / f"{h(i)}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"png")
    with db.session() as s:
        admin = store.get_or_create_user(s, "ada", "admin")
        r1 = store.add_rating(s, world["t1"], world["e1"], 2, correction="Melanoma in situ: excise.", diagnosis="melanoma",
                              comment="patient is 54, from Leeds", flags=["wrong_diagnosis"])
        r2 = store.add_rating(s, world["t2"], world["e2"], 5)
        run = store.start_training_run(s, {"lr": 1e-4})
        store.finish_training_run(s, run.id, status="completed", rating_ids=[r1.id])
        v2 = store.register_version(s, base_model="b", adapter_path="models/v2", parent_id=world["v1"],
                                    training_run_id=run.id)
        v3 = store.register_version(s, base_model="b", adapter_path="models/v3", parent_id=v2.id)
        store.record_image(s, h(3), 10, 10)
        other = store.start_conversation(s, world["doc"], {"age": 30})
        t3 = store.record_turn(s, other.id, "Other?", "Other answer.", image_hashes=[h(2), h(3)], template="qa-v1",
                               model_version_id=world["v1"])
    return dict(world, admin=admin.id, r1=r1.id, r2=r2.id, run=run.id, v2=v2.name, v3=v3.name, other=other.id,
                t3=t3.id, images=images)


def test_erase_removes_content_keeps_ids_and_names_versions_to_retrain(erasable):
    w, db = erasable, erasable["db"]
    done = erase_conversation(db, w["conv"], by="ada", reason="consent withdrawn", images_dir=w["images"])
    assert done.turns == 2 and done.ratings == 2 and done.images_unlinked == 3
    assert done.images_deleted == 2 and done.files_deleted == 2  # h(2) is also in the other conversation
    assert done.trained_versions == [w["v2"], w["v3"]] and done.training_runs == [w["run"]]
    assert "v2, v3" in done.message and "retrain" in done.message
    assert not (w["images"] / h(0)[:2] / f"{h(0)}.png").exists()
    assert not (w["images"] / h(1)[:2] / f"{h(1)}.png").exists()
    assert (w["images"] / h(2)[:2] / f"{h(2)}.png").exists() and (w["images"] / h(3)[:2] / f"{h(3)}.png").exists()
    with db.session() as s:
        turns = s.execute(text("SELECT id, question, answer FROM turns WHERE conversation_id = :c ORDER BY id"),
                          {"c": w["conv"]}).all()
        assert [tuple(t) for t in turns] == [(w["t1"], "", ""), (w["t2"], "", "")]
        ratings = s.execute(text("SELECT id, score, correction, diagnosis, comment FROM ratings ORDER BY id")).all()
        assert [tuple(r) for r in ratings] == [(w["r1"], 2, None, None, None), (w["r2"], 5, None, None, None)]
        assert s.execute(text("SELECT rating_id FROM training_run_ratings")).scalar() == w["r1"]  # lineage kept
        assert "54" not in str(s.execute(text("SELECT context FROM conversations WHERE id = :c"), {"c": w["conv"]}).scalar())
        assert store.known_image_hashes(s, [h(0), h(1), h(2)]) == {h(2)}
        tomb = store.list_erasures(s)[0]
        assert (tomb.conversation_id, tomb.erased_by, tomb.reason) == (w["conv"], "ada", "consent withdrawn")
        assert tomb.trained_versions == [w["v2"], w["v3"]] and tomb.created is not None
        # every read skips it
        with pytest.raises(NotFound, match="erased"):
            store.conversation_history(s, w["conv"])
        assert store.review_queue_count(s, w["e2"], need=2) == 1  # only the other conversation's turn
        assert store.gold_pairs(s).pairs == []  # t2 was rated 5 and r1 corrected: both gone with the erasure
        tables = frames(s)
        assert set(tables["turns"]["turn_id"]) == {w["t3"]}
        assert tables["ratings"].empty and tables["gold_pairs"].empty and tables["preference_pairs"].empty
        by_version = store.stats_by_version(s)
        assert int(by_version["answers"].sum()) == 1 and int(by_version["rated_answers"].sum()) == 0


def test_erased_conversation_takes_no_new_turn_or_rating_and_cannot_be_erased_twice(erasable):
    w, db = erasable, erasable["db"]
    erase_conversation(db, w["conv"], by="ada", reason="wrong patient", images_dir=None)
    with db.session() as s:
        with pytest.raises(Conflict, match="erased"):
            store.add_rating(s, w["t1"], w["e2"], 4)
        with pytest.raises(Conflict, match="erased"):
            store.record_turn(s, w["conv"], "More?", "More.", template="qa-v1", model_version_id=None)
    with pytest.raises(Conflict, match="already erased by ada"):
        erase_conversation(db, w["conv"], by="ada", reason="again", images_dir=None)


def test_only_an_admin_erases_and_a_reason_is_required(erasable):
    w, db = erasable, erasable["db"]
    with pytest.raises(InvalidInput, match="only an admin"):
        erase_conversation(db, w["conv"], by="expert-1", reason="x", images_dir=w["images"])
    with pytest.raises(InvalidInput, match="reason"):
        erase_conversation(db, w["conv"], by="ada", reason="  ", images_dir=w["images"])
    with pytest.raises(NotFound):
        erase_conversation(db, 999, by="ada", reason="x", images_dir=w["images"])
    with db.session() as s:  # nothing changed
        assert store.conversation_history(s, w["conv"])[0].question == "What is this lesion?"
    assert (w["images"] / h(0)[:2] / f"{h(0)}.png").exists()


def test_a_failed_erasure_changes_nothing_and_deletes_no_file(erasable, monkeypatch):
    """All or nothing: an error after the content was blanked rolls everything back, files stay."""
    w, db = erasable, erasable["db"]
    import annotation_db.erase as er

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(er, "Erased", boom)  # fails after every UPDATE, DELETE and the tombstone were flushed
    with pytest.raises(RuntimeError, match="disk full"):
        erase_conversation(db, w["conv"], by="ada", reason="consent withdrawn", images_dir=w["images"])
    with db.session() as s:
        hist = store.conversation_history(s, w["conv"])
        assert [t.question for t in hist] == ["What is this lesion?", "And this one?"]
        assert hist[0].image_hashes == [h(0), h(1)]
        assert store.effective_ratings(s, w["t1"])[0].correction == "Melanoma in situ: excise."
        assert store.list_erasures(s) == []
    assert all((w["images"] / h(i)[:2] / f"{h(i)}.png").exists() for i in range(4))


def test_an_image_recorded_again_before_the_files_go_keeps_its_file(erasable, monkeypatch):
    w, db = erasable, erasable["db"]
    import annotation_db.erase as er

    real = er.delete_image_files

    def re_record_then_delete(store_, images_dir, hashes):
        with store_.session() as s:  # another clinician uploads the same image meanwhile
            store.record_image(s, h(0), 64, 48)
        return real(store_, images_dir, hashes)

    monkeypatch.setattr(er, "delete_image_files", re_record_then_delete)
    done = erase_conversation(db, w["conv"], by="ada", reason="consent withdrawn", images_dir=w["images"])
    assert done.files_deleted == 1
    assert (w["images"] / h(0)[:2] / f"{h(0)}.png").exists()
    assert not (w["images"] / h(1)[:2] / f"{h(1)}.png").exists()


def test_cli_erases_with_one_line(erasable, capsys):
    from annotation_db.cli import run

    w = erasable
    url = w["db"].url
    home = w["images"].parent
    assert run(["erase", str(w["conv"]), "--db", url, "--home", str(home), "--by", "ada", "--reason", "consent"]) == 0
    assert "Conversation" in capsys.readouterr().out
    assert run(["erase", str(w["conv"]), "--db", url, "--home", str(home), "--by", "ada", "--reason", "consent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("annotation_db: conversation") and "already erased" in err and "\n" == err[-1]


def test_a_version_trained_on_a_blind_preference_about_it_is_named(erasable):
    """A DPO run that learned only from an expert's blind A/B judgement of a case copied from the
    conversation (no rating of it) is still named on the tombstone, with its descendants."""
    from annotation_db import pairwise as pw
    from annotation_db.models import Side

    w, db = erasable, erasable["db"]
    with db.session() as s:
        q = pw.add_pairwise_cases(s, [pw.CaseIn("What is this lesion?", "Melanoma.", "Naevus.", [h(0)], turn_id=w["t1"])],
                                  candidate=w["v2"], active=w["v1"], batch="b")
        case = q.case_ids[0]
        pref = pw.record_preference(s, case, w["e2"], "a" if pw.shown_first(case, w["e2"]) is Side.candidate else "b")
        with pytest.raises(NotFound, match="pairwise preference"):
            store.finish_training_run(s, store.start_training_run(s, {}).id, status="completed", preference_ids=[10**6])
    with db.session() as s:
        run = store.start_training_run(s, {"method": "dpo"})
        store.finish_training_run(s, run.id, status="completed", preference_ids=[pref.preference_id])
        v4 = store.register_version(s, base_model="b", adapter_path="models/v4", parent_id=w["v1"], training_run_id=run.id)
        v5 = store.register_version(s, base_model="b", adapter_path="models/v5", parent_id=v4.id)
        names, run_id = (v4.name, v5.name), run.id
    done = erase_conversation(db, w["conv"], by="ada", reason="consent withdrawn", images_dir=w["images"])
    assert done.trained_versions == [w["v2"], w["v3"], *names] and done.training_runs == [w["run"], run_id]
    with db.session() as s:  # the lineage row stays: the ids are kept, the content is gone
        assert s.execute(text("SELECT preference_id FROM training_run_preferences")).scalar() == pref.preference_id
