"""Alembic migrations: empty -> head matches the models, head -> base, and a database
created at the first revision with rows in it keeps every row on upgrade."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from annotation_db import Store, store
from annotation_db.db import current_revision, downgrade, make_engine, upgrade
from annotation_db.models import Base

TABLES = {"users", "images", "conversations", "conversation_images", "turns", "ratings", "model_versions",
          "training_runs", "training_run_ratings", "training_run_preferences", "eval_split", "locks", "erasures", "pairwise_cases",
          "pairwise_preferences", "alembic_version"}
HEAD = "0006"




def test_head_matches_models_and_downgrades_to_base(url):
    upgrade(url)
    assert current_revision(url) == HEAD
    engine = make_engine(url)
    with engine.connect() as c:
        assert set(inspect(c).get_table_names()) == TABLES
        assert compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata) == []
        indexes = {i["name"]: i for i in inspect(c).get_indexes("model_versions")}
        assert indexes["uq_model_versions_one_active"]["unique"]
        assert "ix_ratings_turn_rater" in {i["name"] for i in inspect(c).get_indexes("ratings")}
        if url.startswith("sqlite"):
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    downgrade(url, "base")
    with engine.connect() as c:
        assert set(inspect(c).get_table_names()) == {"alembic_version"}
    upgrade(url)  # and back up again
    assert current_revision(url) == HEAD
    engine.dispose()


def test_rows_written_at_first_revision_survive_upgrade(url):
    upgrade(url, "0001")
    engine = make_engine(url)
    with engine.begin() as c:
        c.execute(text("INSERT INTO users (id, name, role) VALUES (1, 'doc', 'clinician'), (2, 'e1', 'expert'),"
                       " (3, 'e2', 'expert')"))
        c.execute(text("INSERT INTO conversations (id, user_id, context) VALUES (1, 1, '{\"age\": 61}')"))
        c.execute(text("INSERT INTO turns (id, conversation_id, seq, question, answer, template, settings,"
                       " status) VALUES (1, 1, 0, 'q?', 'a.', 't', '{}', 'complete'),"
                       " (2, 1, 1, 'q2?', 'a2.', 't', '{}', 'complete')"))
        c.execute(text("INSERT INTO ratings (id, turn_id, rater_id, score, correction, flags) VALUES"
                       " (1, 1, 2, 2, 'fixed', '[]'), (2, 1, 3, 4, NULL, '[\"unsafe\"]'), (3, 1, 2, 3, NULL, '[]')"))
        c.execute(text("INSERT INTO training_runs (id, config, status) VALUES (1, '{}', 'completed')"))
        c.execute(text("INSERT INTO training_run_ratings (run_id, rating_id) VALUES (1, 1)"))
        if url.startswith("postgresql"):  # explicit ids: move the sequences past them
            for table in ("users", "conversations", "turns", "ratings", "training_runs"):
                c.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"))
    engine.dispose()
    st = Store.open(url)  # migrates to head
    with st.session() as s:
        rows = s.execute(text("SELECT id, score, correction, kind FROM ratings ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [(1, 2, "fixed", "full"), (2, 4, None, "full"), (3, 3, None, "full")]
        counts = dict(s.execute(text("SELECT id, expert_raters FROM turns")).all())
        assert counts == {1: 2, 2: 0}  # backfilled: two distinct experts on turn 1
        assert store.conversation_history(s, 1)[0].question == "q?"
        assert [i.turn_id for i in store.review_queue(s, 3, limit=5)] == [2]
        assert s.execute(text("SELECT rating_id FROM training_run_ratings")).scalar() == 1
        store.add_rating(s, 2, 1, 5, kind="thumbs")  # the new column works
    with pytest.raises(RuntimeError, match="thumbs"):
        downgrade(url, "0001")  # refuses to lose what a thumbs rating meant
    st.dispose()


def test_upgrade_works_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    upgrade(url)
    assert current_revision(url) == HEAD


def test_0003_downgrade_refuses_to_lose_tombstones(url):
    from annotation_db.erase import erase_conversation

    st = Store.open(url)
    with st.session() as s:
        admin = store.get_or_create_user(s, "ada", "admin")
        cid = store.start_conversation(s, admin.id, {"age": 40}).id
        store.record_turn(s, cid, "q?", "a.", template="t", model_version_id=None)
    downgrade(url, "0002")  # nothing erased yet: the column and table go, every row stays
    assert current_revision(url) == "0002"
    upgrade(url)
    erase_conversation(st, cid, by="ada", reason="consent withdrawn", images_dir=None)
    with pytest.raises(RuntimeError, match="erased conversation"):
        downgrade(url, "0002")
    # PostgreSQL rolls the whole downgrade back; SQLite's DDL is not transactional, so the steps above 0003 (no rows) stay done
    assert current_revision(url) in ("0003", HEAD)
    assert "erasures" in inspect(make_engine(url)).get_table_names()
    st.dispose()
