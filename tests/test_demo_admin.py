"""Erasure in the app and the named API, and flags on /rate (handlers called directly).

    python -m pytest -q tests/test_demo_admin.py
"""

from __future__ import annotations

import json

import gradio as gr
import pytest

from annotation_db import store as st
from core.images import image_path
from demo.admin import Admin
from demo.consult import Case, Consult
from demo.review import Review, ReviewState

from conftest import ask, counts, draw_lesion, req, save_png


def test_an_admin_erases_a_conversation_and_its_image_files_in_the_app(ctx, tmp_path, store):  # noqa: F811
    consult = Consult(ctx)
    ask(consult, Case(), [save_png(tmp_path / "a.png")], "Withdrawn question?", who="cara")
    ask(consult, Case(), [save_png(tmp_path / "b.png", draw_lesion(colour=(10, 200, 10)))], "Kept question?", who="cara")
    assert consult.api_rate(1, 2, "A corrected answer.", "eczema", "", req("eve"), ["unsafe"]) >= 1
    with store.session() as s:
        sha = st.conversation_history(s, 1)[0].image_hashes[0]
    assert image_path(ctx.settings.images_dir, sha).is_file()
    admin = Admin(ctx)
    with pytest.raises(gr.Error, match="confirm"):
        admin.erase(1, "consent withdrawn", False, req("ada"))
    with pytest.raises(gr.Error, match="only admins can erase"):
        admin.erase(1, "consent withdrawn", True, req("eve"))
    with pytest.raises(gr.Error, match="reason"):
        admin.erase(1, "", True, req("ada"))
    status, table = admin.erase(1, "consent withdrawn", True, req("ada"))
    assert "Conversation 1 erased: 1 turn(s), 1 rating(s)" in status
    assert table.iloc[0][["conversation", "erased by", "reason"]].tolist() == [1, "ada", "consent withdrawn"]
    assert not image_path(ctx.settings.images_dir, sha).exists()
    assert counts(store) == {"turns": 1, "ratings": 0}
    out = Review(ctx).load(ReviewState(), False, req("max"))  # the erased answer left the queue
    assert "Kept question?" in out[4] and "**1** answer left" in out[1]
    with pytest.raises(gr.Error, match="erased"):
        consult.api_ask([], "More?", "", "1", req("cara"))
    with pytest.raises(gr.Error, match="already erased"):
        admin.erase(1, "again", True, req("ada"))


def test_api_erase_returns_the_tombstone_and_names_versions_to_retrain(ctx, tmp_path, store):  # noqa: F811
    consult = Consult(ctx)
    _, cid, tid, _ = consult.api_ask([save_png(tmp_path / "a.png")], "What is it?", "", "", req("cara"))
    rating = consult.api_rate(tid, 5, "", "", "", req("eve"))
    with store.session() as s:  # a refine run learned from that rating and produced v2
        run = st.start_training_run(s, {"method": "sft"})
        st.finish_training_run(s, run.id, status="completed", rating_ids=[rating])
        st.register_version(s, base_model=ctx.settings.model, training_run_id=run.id, parent_id=1)
    with pytest.raises(gr.Error, match="expert: only admins"):
        Admin(ctx).api_erase(cid, "wrong image", req("eve"))
    tomb = json.loads(Admin(ctx).api_erase(str(cid), "wrong image", req("ada")))
    assert tomb["conversation_id"] == cid and tomb["erased_by"] == "ada" and tomb["reason"] == "wrong image"
    assert tomb["trained_versions"] == ["v2"] and tomb["training_runs"] == [run.id] and tomb["turns"] == 1


def test_rate_takes_flags_as_a_list_or_text_and_names_an_unknown_one(ctx, tmp_path, store):  # noqa: F811
    consult = Consult(ctx)
    _, _, tid, _ = consult.api_ask([save_png(tmp_path / "a.png")], "What is it?", "", "", req("cara"))
    consult.api_rate(tid, 2, "", "", "", req("eve"), ["unsafe", "hallucination"])
    consult.api_rate(tid, 3, "", "", "", req("max"), flags="incomplete, wrong_diagnosis")
    with store.session() as s:
        assert [r.flags for r in st.effective_ratings(s, tid)] == [["hallucination", "unsafe"], ["incomplete", "wrong_diagnosis"]]
    with pytest.raises(gr.Error, match="unknown flag 'rude'"):
        consult.api_rate(tid, 3, "", "", "", req("max"), ["rude"])
