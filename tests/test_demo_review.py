"""Review in the app: a follow-up shown with the conversation that led to it, queue filters with
counts, and the opt-in self-review setting (handlers called directly).

    python -m pytest -q tests/test_demo_review.py
"""

from __future__ import annotations

from annotation_db import store as st
from core.config import Settings
from demo.common import Ctx
from demo.consult import Case, Consult
from demo.review import Review, ReviewState
from demo.runtime import attach

from conftest import ask, draw_lesion, req, save_png


def test_a_follow_up_comes_with_the_earlier_questions_answers_and_images(ctx, tmp_path):  # noqa: F811
    consult, case = Consult(ctx), Case()
    ask(consult, case, [save_png(tmp_path / "a.png")], "First question <b>bold</b>?", who="cara")
    ask(consult, case, [save_png(tmp_path / "b.png", draw_lesion(colour=(10, 10, 200)))], "Second question?", who="cara")
    review, state = Review(ctx), ReviewState()
    out = review.load(state, False, req("max"))
    assert "First question" in out[4] and out[12] == ""  # the first turn: nothing before it
    out = review.skip(state, False, req("max"))
    assert "Follow-up question" in out[4] and "Second question?" in out[4]
    history = out[12]
    assert "earlier turn" in history and "**Q1:** First question &lt;b&gt;bold&lt;/b&gt;?" in history
    assert "**A1:**" in history and "Q1.1" in history
    captions = [c for _, c in out[2]]
    assert captions == ["given with Q1 (Q1.1)", "given with Q2 (Q2.1)"]


def test_filters_have_counts_and_narrow_the_queue(ctx, tmp_path, store):  # noqa: F811
    consult = Consult(ctx)
    for i in range(3):
        ask(consult, Case(), [save_png(tmp_path / f"{i}.png", draw_lesion(colour=(60 * i, 60, 40)))], f"Question {i}?", who="cara")
    consult.api_rate(1, 4, "", "", "", req("eve"), ["incomplete"])  # flagged
    consult.api_rate(2, 1, "", "", "", req("eve"))  # low score
    review, state = Review(ctx), ReviewState()
    out = review.load(state, False, req("max"))
    assert out[13]["choices"] == [("All (3)", "all"), ("Flagged (1)", "flagged"), ("Low score (1)", "low")]
    assert out[14]["choices"] == [("All versions (3)", ""), ("v1 (3)", "v1")]
    out = review.filter(state, False, "flagged", "", req("max"))
    assert "Question 0?" in out[4] and "**1** answer (flagged) left" in out[1]
    out = review.filter(state, False, "low", "v1", req("max"))
    assert "Question 1?" in out[4] and "(low score) from v1" in out[1]
    out = review.save(state, False, 2, state.answer, "", [], "", req("max"))
    assert "Nothing left" in out[4] and out[13]["choices"][2] == ("Low score (0)", "low")


def test_own_answers_are_reviewable_only_when_the_setting_allows(settings, tiny_engine, store, tmp_path):  # noqa: F811
    from demo.auth import AuthConfig
    from demo.runtime import DemoOptions

    options = DemoOptions(review_need=1, poll_s=0)
    local = AuthConfig.local("solo")
    off = Ctx(attach(settings, tiny_engine, store, options), local, options)
    ask(Consult(off), Case(), [save_png(tmp_path / "a.png")], "My own question?", who=None)
    out = Review(off).load(ReviewState(), False, req(None))
    assert "Nothing left" in out[4] and "--review-own-answers" in out[4]
    on_settings = Settings.from_env(environ={"DERMALOOP_REVIEW_OWN_ANSWERS": "1"}, model=settings.model, max_new_tokens=8)
    assert on_settings.review_own_answers is True
    on = Ctx(attach(on_settings, tiny_engine, store, options), local, options)
    state = ReviewState()
    out = Review(on).load(state, False, req(None))
    assert "My own question?" in out[4]
    tid = state.turn_id
    Review(on).save(state, False, 4, state.answer, "", [], "", req(None))
    with store.session() as s:
        assert [r.score for r in st.effective_ratings(s, tid)] == [4]
        assert st.review_queue_count(s, st.get_or_create_user(s, "solo").id, include_own=True) == 0


def test_insights_say_in_words_what_is_missing_instead_of_empty_frames(ctx, tmp_path):  # noqa: F811
    from demo.insights import Insights

    outs = Insights(ctx).refresh(req("eve"))
    assert "No answers yet" in outs[-1] and "No refinement yet" in outs[-1]
    assert all(outs[i]["visible"] is False for i in (1, 2, 3, 6))  # no empty plot frames
    ask(Consult(ctx), Case(), [save_png(tmp_path / "a.png")], "What?", who="cara")
    Consult(ctx).api_rate(1, 4, "", "", "", req("eve"))
    outs = Insights(ctx).refresh(req("eve"))
    assert outs[1]["visible"] is True and outs[3]["visible"] is False  # one day of ratings: no one-point trend line
    assert "two days" in outs[-1] and "No answers yet" not in outs[-1]
