"""Review's "Compare two answers" mode (demo/pairwise.py), handlers called directly: A and B without
version names, judged by experts only, the versions revealed after judging, skip, empty states in
words, the own-answers setting; the Insights tab's version-against-version table.

    python -m pytest -q tests/test_demo_pairwise.py
"""

from __future__ import annotations

import gradio as gr
import pytest

from annotation_db import pairwise as pw
from annotation_db import store as st
from demo.consult import Case, Consult
from demo.pairwise import PANEL, Compare, PairState

from conftest import ask, draw_lesion, req, save_png


@pytest.fixture
def queued(ctx, tmp_path, store):  # noqa: F811
    """Two cases of candidate v2 against v1: one from cara's question (with its image), one held out."""
    ask(Consult(ctx), Case(), [save_png(tmp_path / "a.png", draw_lesion(colour=(90, 40, 30)))], "What is it?", who="cara")
    with store.session() as s:
        v2 = st.register_version(s, base_model="b", adapter_path="models/v2")
        turn = st.conversation_history(s, 1)[0]
        cases = [pw.CaseIn("What is it?", "Candidate: **melanoma**, refer.", "Active: a benign naevus.", turn.image_hashes,
                           {"age": 61, "body_site": "back"}, turn_id=turn.turn_id),
                 pw.CaseIn("Second question?", "Candidate held-out answer.", "Active held-out answer.")]
        pw.add_pairwise_cases(s, cases, candidate=v2.id, active="v1", batch="refine-test")
    return turn


def test_compare_mode_shows_a_and_b_blind_then_reveals_the_versions(ctx, queued, store):  # noqa: F811
    compare, state = Compare(ctx), PairState()
    out = compare.show("compare", state, req("max"))
    assert out["compare_col"]["visible"] is True and out["rate_col"]["visible"] is False
    assert set(PANEL) <= set(out)
    assert "What is it?" in out["question"] and "**Age:** 61" in out["context"] and len(out["images"]) == 1
    shown = {out["answer_a"], out["answer_b"]}
    assert shown == {"Candidate: **melanoma**, refer.", "Active: a benign naevus."}
    page = " ".join(str(v) for v in out.values() if isinstance(v, str))
    assert "v1" not in page and "v2" not in page and "candidate" not in page.lower().replace("candidate:", "")
    assert "**2** pairs left" in out["counter"]
    a_is_candidate = out["answer_a"].startswith("Candidate")

    out = compare.judge_a(state, "  The answer I would give.  ", req("max"))
    assert out["head_a"].startswith("### Answer A · " + ("v2 (candidate)" if a_is_candidate else "v1 (active)"))
    assert "✅" in out["head_a"] and out["judge_row"]["visible"] is False and out["next_btn"]["visible"] is True
    assert "A was **" in out["status"] and "**1** pair left" in out["counter"]
    with store.session() as s:
        summary = pw.pairwise_summary(s, batch="refine-test")[0]
        assert (summary.wins, summary.losses) == ((1, 0) if a_is_candidate else (0, 1))
        (dpo,) = [p for p in pw.pairwise_preference_pairs(s, corrections_only=True) if p.rejected.startswith("Candidate")]
        assert dpo.chosen == "The answer I would give." and dpo.image_hashes == queued.image_hashes
    with pytest.raises(gr.Error, match="judged already"):
        compare.judge_b(state, "", req("max"))

    out = compare.load(state, req("max"))
    assert "Second question?" in out["question"] and out["images"] == [] and "No clinical context" in out["context"]
    out = compare.skip(state, req("max"))
    assert "Only skipped pairs are left" in out["question"] and out["judge_row"]["visible"] is False
    eve = PairState()
    out = compare.show("compare", eve, req("eve"))  # another expert: the first pair has its rater
    assert "Second question?" in out["question"]
    out = compare.judge_tie(eve, "", req("eve"))
    assert "🤝" in out["head_a"] and "🤝" in out["head_b"]
    out = compare.load(PairState(), req("eve"))
    assert "No pairs left to compare" in out["question"] and "--human-gate" in out["question"]


def test_clinicians_are_refused_and_rate_mode_changes_nothing(ctx, queued):  # noqa: F811
    compare = Compare(ctx)
    with pytest.raises(gr.Error, match="expert"):
        compare.show("compare", PairState(), req("cara"))
    with pytest.raises(gr.Error, match="expert"):
        compare.judge_a(PairState(case_id=1), "", req("cara"))
    out = compare.show("rate", PairState(), req("cara"))  # switching back needs no role: it only hides the panel
    assert out["rate_col"]["visible"] is True and out["compare_col"]["visible"] is False
    with pytest.raises(gr.Error, match="no pair on screen"):
        compare.judge_a(PairState(), "", req("max"))


def test_a_page_state_belongs_to_one_user(ctx, queued):  # noqa: F811
    compare, state = Compare(ctx), PairState()
    compare.show("compare", state, req("max"))
    with pytest.raises(gr.Error, match="another signed-in user"):
        compare.judge_a(state, "", req("eve"))


def test_own_questions_only_with_the_setting(settings, tiny_engine, store, tmp_path):  # noqa: F811
    from core.config import Settings
    from demo.auth import AuthConfig
    from demo.common import Ctx
    from demo.runtime import DemoOptions, attach

    options, local = DemoOptions(review_need=1, poll_s=0), AuthConfig.local("solo")
    off = Ctx(attach(settings, tiny_engine, store, options), local, options)
    ask(Consult(off), Case(), [save_png(tmp_path / "a.png")], "My own question?", who=None)
    with store.session() as s:
        v2 = st.register_version(s, base_model="b", adapter_path="models/v2")
        turn = st.conversation_history(s, 1)[0]
        pw.add_pairwise_cases(s, [pw.CaseIn("My own question?", "x.", "y.", turn.image_hashes, turn_id=turn.turn_id)],
                              candidate=v2.id, active="v1", batch="b")
    out = Compare(off).show("compare", PairState(), req(None))
    assert "No pairs left" in out["question"] and "--review-own-answers" in out["question"]
    on_settings = Settings.from_env(environ={"DERMALOOP_REVIEW_OWN_ANSWERS": "1"}, model=settings.model, max_new_tokens=8)
    on = Ctx(attach(on_settings, tiny_engine, store, options), local, options)
    state = PairState()
    out = Compare(on).show("compare", state, req(None))
    assert "My own question?" in out["question"]
    Compare(on).judge_b(state, "", req(None))
    with store.session() as s:
        assert pw.pairwise_summary(s)[0].judgements == 1
