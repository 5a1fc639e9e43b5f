"""Review-queue filters and counts (flagged, low score, per version, one's own answers), SQLite and PostgreSQL.

    python -m pytest -q tests/test_store_queue.py
"""

from __future__ import annotations

from annotation_db import store


def test_filters_and_counts(world):
    w, db = world, world["db"]
    with db.session() as s:
        v2 = store.register_version(s, base_model="b", adapter_path="models/v2", status="active")
        c = store.start_conversation(s, w["e1"], {})
        t3 = store.record_turn(s, c.id, "Own question?", "Own answer.", template="qa-v1", model_version_id=v2.id)
        store.add_rating(s, w["t1"], w["e1"], 4, flags=["incomplete"])  # flagged, not low
        store.add_rating(s, w["t2"], w["doc"], 1, kind="thumbs")  # a thumbs down: low score
        e3 = store.get_or_create_user(s, "expert-3").id
        all_ = store.review_queue_counts(s, e3, need=2)
        assert (all_.total, all_.flagged, all_.low_score) == (3, 1, 1)
        assert all_.by_version == {"v1": 2, "v2": 1}
        assert [i.turn_id for i in store.review_queue(s, e3, need=2, flagged=True, limit=5)] == [w["t1"]]
        assert [i.turn_id for i in store.review_queue(s, e3, need=2, low_score=True, limit=5)] == [w["t2"]]
        assert [i.turn_id for i in store.review_queue(s, e3, need=2, model_version_id=v2.id, limit=5)] == [t3.id]
        assert store.review_queue_count(s, e3, need=2, flagged=True, low_score=True) == 0
        item = store.review_queue(s, e3, need=2, low_score=True)[0]
        assert item.seq == 1 and item.image_hashes == [*store.conversation_history(s, w["conv"])[0].image_hashes,
                                                        *store.conversation_history(s, w["conv"])[1].image_hashes]
        # expert-1 asked t3: not in their queue unless they opt in (one person trying the loop)
        assert t3.id not in [i.turn_id for i in store.review_queue(s, w["e1"], need=2, limit=5)]
        assert t3.id in [i.turn_id for i in store.review_queue(s, w["e1"], need=2, limit=5, include_own=True)]
        assert store.review_queue_counts(s, w["e1"], need=2, include_own=True).by_version == {"v1": 1, "v2": 1}
        # a re-rating without a low score takes the turn out of "low score" (only effective ratings count)
        store.add_rating(s, w["t2"], w["doc"], 5, kind="thumbs")
        assert store.review_queue_counts(s, e3, need=2).low_score == 0
