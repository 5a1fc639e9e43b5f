"""Regenerate (the chat's Retry): the latest answer asked again becomes a new turn that names the old
one; the old row and its ratings stay as they were, and the conversation's history leaves it out.

    python -m pytest -q tests/test_demo_regenerate.py
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pytest

from annotation_db import store as st
from annotation_db.conversation import read_conversation
from annotation_db.errors import Conflict, NotFound
from annotation_db.export import frames
from annotation_db.models import Conversation, Turn
from demo.consult import Case, Consult

from conftest import ask, h, req, save_png


def test_a_regenerated_answer_is_a_new_turn_and_leaves_the_history(world):
    db = world["db"]
    with db.session() as s:
        old = s.get(Turn, world["t2"])
        before = (old.question, old.answer, old.seq)
        st.add_rating(s, world["t2"], world["e1"], 2, correction="A dysplastic naevus.")
        new = st.record_turn(s, world["conv"], "And this one?", "A dermatofibroma.", image_hashes=[h(2)], template="qa-v1",
                             model_version_id=world["v1"], regenerates=world["t2"])
        new_id = new.id
    with db.session() as s:
        kept = s.get(Turn, world["t2"])
        assert (kept.question, kept.answer, kept.seq) == before
        assert [r.correction for r in st.effective_ratings(s, world["t2"])] == ["A dysplastic naevus."]  # untouched
        history = st.conversation_history(s, world["conv"])
        assert [(t.turn_id, t.answer, t.image_hashes) for t in history][1:] == [(new_id, "A dermatofibroma.", [h(2)])]
        assert history[1].regenerates_id == world["t2"]
        assert [t.turn_id for t in st.conversation_history(s, world["conv"], regenerated=True)] == [world["t1"], world["t2"], new_id]
        view = read_conversation(s, world["conv"], reader="dr-clinic", any_owner=False)
        assert [t["turn_id"] for t in view["turns"]] == [world["t1"], new_id] and view["regenerated"] == [world["t2"]]
        turns = frames(s)["turns"]
        assert turns.set_index("turn_id").loc[new_id, "regenerates"] == world["t2"]


def test_only_the_latest_answer_of_the_same_conversation_is_regenerated_once(world):
    db = world["db"]
    with db.session() as s, pytest.raises(Conflict, match="only the latest answer"):
        st.record_turn(s, world["conv"], "What is this lesion?", "x", template="qa-v1", model_version_id=None,
                       regenerates=world["t1"])  # t2 follows it
    with db.session() as s:
        other = st.start_conversation(s, world["doc"]).id
    with db.session() as s, pytest.raises(NotFound, match="no answer"):
        st.record_turn(s, other, "q?", "x", template="qa-v1", model_version_id=None, regenerates=world["t2"])
    with db.session() as s:
        st.record_turn(s, world["conv"], "And this one?", "y", template="qa-v1", model_version_id=None, regenerates=world["t2"])
    with db.session() as s, pytest.raises(Conflict, match="only the latest answer"):  # t2 was regenerated already
        st.record_turn(s, world["conv"], "And this one?", "z", template="qa-v1", model_version_id=None, regenerates=world["t2"])


def retry(index: int):
    return SimpleNamespace(index=index, value="")  # what gr.RetryData carries: the question the answer followed


def regenerate(consult, case, index: int, who: str = "eve"):
    form = {"case": case, "files": None, "question": "", "template": "free"}
    return list(consult.regenerate(form, retry(index), req(who)))


def test_regenerate_samples_a_new_turn_and_the_chat_shows_it_in_place_of_the_old(ctx, tmp_path, store):
    consult, case = Consult(ctx), Case()
    ask(consult, case, [save_png(tmp_path / "a.png")], "What is this lesion?", age=54)
    old_id, old_answer = case.last_turn_id, case.last_answer
    assert "saved" in consult.like(case, SimpleNamespace(index=2, value=None, liked=False), req("eve"))
    messages, new_case, _, correction, status = regenerate(consult, case, index=1)[-1]  # image, question, answer
    assert [m["role"] for m in messages] == ["user", "user", "assistant"] and "model v1" in messages[-1]["content"]
    assert messages[0]["content"]["path"] == str(tmp_path / "a.png")  # the image stays where it was given
    assert new_case.last_turn_id != old_id and new_case.turn_ids == {2: new_case.last_turn_id}
    assert f"answer #{old_id} is kept" in status["value"] and correction["value"] == new_case.last_answer
    with store.session() as s:
        old = s.get(Turn, old_id)
        new = s.get(Turn, new_case.last_turn_id)
        assert old.answer == old_answer and [r.score for r in st.effective_ratings(s, old_id, kind="thumbs")] == [1]
        assert (new.regenerates_id, new.question, new.conversation_id) == (old_id, "What is this lesion?", old.conversation_id)
        assert new.settings["do_sample"] is True and old.settings["do_sample"] is False  # greedy would repeat itself
        history = st.conversation_history(s, old.conversation_id)
        assert [t.turn_id for t in history] == [new.id] and len(history[0].image_hashes) == 1
        assert s.get(Conversation, old.conversation_id).context == {"age": 54}
    # a follow-up continues from the regenerated answer
    ask(consult, new_case, None, "Is it dangerous?")
    with store.session() as s:
        assert [t.question for t in st.conversation_history(s, new_case.conversation_id)] == ["What is this lesion?", "Is it dangerous?"]
        assert len(st.conversation_history(s, new_case.conversation_id, regenerated=True)) == 3


def test_regenerate_refuses_an_older_answer_or_none(ctx, tmp_path, store):
    consult, case = Consult(ctx), Case()
    with pytest.raises(gr.Error, match="no finished answer"):
        regenerate(consult, case, index=0)
    ask(consult, case, [save_png(tmp_path / "a.png")], "What is this lesion?")
    ask(consult, case, None, "Is it dangerous?")
    with pytest.raises(gr.Error, match="only the latest answer"):
        regenerate(consult, case, index=1)  # the first question's answer has a follow-up after it
    with store.session() as s:
        assert len(st.conversation_history(s, case.conversation_id, regenerated=True)) == 2  # nothing recorded
    messages, new_case, *_ = regenerate(consult, case, index=3)[-1]
    assert len(messages) == 5 and [t.question for t in new_case.turns] == ["What is this lesion?", "Is it dangerous?"]


def test_review_numbers_the_questions_of_a_regenerated_conversation_by_their_place(ctx, tmp_path):
    from demo.review import Review, ReviewState

    consult, case = Consult(ctx), Case()
    ask(consult, case, [save_png(tmp_path / "a.png")], "What is this lesion?", who="cara")
    case = regenerate(consult, case, index=1, who="cara")[-1][1]
    ask(consult, case, None, "Is it urgent?", who="cara")
    review, state = Review(ctx), ReviewState()
    out = review.open(state, False, req("eve"))
    for _ in range(2):  # the first answer and its regeneration: both are real answers, both reviewable
        assert out[4].startswith("**Question (") and "What is this lesion?" in out[4] and out[12] == ""
        out = review.skip(out[0], False, req("eve"))
    assert out[4].startswith("**Follow-up question (") and "Is it urgent?" in out[4]
    assert "**Q1:** What is this lesion?" in out[12] and "Q2" not in out[12]
    assert [caption for _, caption in out[2]] == ["given with Q1 (Q1.1)"]
