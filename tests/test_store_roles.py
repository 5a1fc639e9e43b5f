"""Roles follow the auth config (promotions count, admins count as experts), rollback to a
rejected version needs forced=True, and concurrent writers never collide on a unique key."""

from __future__ import annotations

import threading

import pytest

from annotation_db import store
from annotation_db.errors import Conflict
from annotation_db.models import Turn


def counter(s, turn_id: int) -> int:
    s.expire_all()
    return s.get(Turn, turn_id).expert_raters


def test_promoted_user_counts_and_demotion_recounts(world):
    db, t1, t2 = world["db"], world["t1"], world["t2"]
    with db.session() as s:
        nurse = store.get_or_create_user(s, "nurse", "clinician")
        store.add_rating(s, t1, nurse.id, 2, correction="A melanoma.")
        assert counter(s, t1) == 0
        assert store.gold_pairs(s).pairs == []
    with db.session() as s:  # the auth config now says expert: the earlier rating counts
        assert store.get_or_create_user(s, "nurse", "expert").role.value == "expert"
        assert counter(s, t1) == 1
        assert [p.target for p in store.gold_pairs(s).pairs] == ["A melanoma."]
        assert store.review_queue_count(s, world["e1"], need=1) == 1  # only t2 still needs a review
    with db.session() as s:  # and back: it no longer counts
        store.get_or_create_user(s, "nurse", "clinician")
        assert counter(s, t1) == 0 and counter(s, t2) == 0
        assert store.get_or_create_user(s, "nurse").role.value == "clinician"  # no role: kept


def test_admin_reviews_count_as_expert_reviews(world):
    db, t1 = world["db"], world["t1"]
    with db.session() as s:
        ada = store.get_or_create_user(s, "ada", "admin")
        store.add_rating(s, t1, ada.id, 5)
        store.add_rating(s, t1, ada.id, 2, correction="Pigmented BCC.")  # one rater, counted once
        assert counter(s, t1) == 1
        assert store.review_queue_count(s, world["e1"], need=1) == 1
        assert [p.target for p in store.gold_pairs(s).pairs] == ["Pigmented BCC."]
        assert store.gold_pairs(s, roles=("expert",)).pairs == []
        store.get_or_create_user(s, "ada", "expert")  # admin -> expert: still counted, no recount needed
        assert counter(s, t1) == 1


def test_rollback_to_rejected_version_needs_forced(world):
    db = world["db"]
    with db.session() as s:
        v2 = store.register_version(s, base_model="b", adapter_path="models/v2", parent_id=world["v1"])
        store.promote(s, v2.id)  # v1 retired
        v3 = store.register_version(s, base_model="b", adapter_path="models/v3", parent_id=v2.id)
        store.reject(s, v3.id, "rejected by the gate: rougeL fell")
        with pytest.raises(Conflict, match="forced=True"):
            store.rollback(s, v3.id)
        assert store.active_version(s).id == v2.id and v3.status.value == "rejected"
        store.rollback(s, v3.id, reason="expert override", forced=True)
        assert store.active_version(s).id == v3.id and v3.status_reason == "forced expert override"
        store.rollback(s, "v1")  # a retired version: as before, no forced needed
        assert store.active_version(s).name == "v1" and v3.status.value == "retired"


def test_concurrent_turns_and_users_never_collide(db):
    with db.session() as s:
        doc = store.get_or_create_user(s, "doc", "clinician")
        v = store.ensure_base_version(s, "base")
        conv = store.start_conversation(s, doc.id, {}).id
    errors: list[Exception] = []
    start = threading.Barrier(8)

    def ask(i: int) -> None:
        start.wait()
        for j in range(10):
            try:
                with db.session() as s:
                    store.get_or_create_user(s, f"user-{j}", "expert")
                    store.record_turn(s, conv, f"q{i}-{j}", "a", template="t", model_version_id=v.id)
            except Exception as e:  # noqa: BLE001  collected and asserted empty
                errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    with db.session() as s:
        hist = store.conversation_history(s, conv)
        assert sorted(t.seq for t in hist) == list(range(80))
        assert {t.question for t in hist} == {f"q{i}-{j}" for i in range(8) for j in range(10)}
