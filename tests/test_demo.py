"""The app's handlers called directly, with the tiny model and a temporary store.

Consult (ask, stream, stop, follow-up, new case, thumbs, rating), Review (queue,
blind, skip, counter), Insights (figures, export, rollback), roles enforced
server-side, and every kind of bad input: a clear message and nothing stored.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd
import pytest

from annotation_db import store as st
from core.config import Settings
from demo.auth import AuthConfig
from demo.common import Ctx
from demo.consult import Case, Consult
from demo.insights import Insights
from demo.review import Review, ReviewState
from demo.runtime import DemoOptions, attach

from conftest import ask, counts, draw_lesion, req, save_png

# ---------------------------------------------------------------------------- consult


def test_ask_streams_records_and_shows_version(ctx, tmp_path, store):
    consult, case = Consult(ctx), Case()
    outs = ask(consult, case, [save_png(tmp_path / "a.png")], "What is this lesion?", age=54, sex="female",
               body_site="back", fitzpatrick="III", modality="clinical")
    assert len(outs) >= 3  # a placeholder, at least one streamed chunk, the final answer
    messages, case_out, question_box, correction, status = outs[-1]
    # the image at the turn it was given (a file message), then the question, then the answer
    assert messages[0]["role"] == "user" and messages[0]["content"]["path"] == str(tmp_path / "a.png")
    assert messages[1]["role"] == "user" and "What is this lesion?" in messages[1]["content"]
    assert messages[-1]["role"] == "assistant" and "model v1" in messages[-1]["content"]
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", messages[-1]["content"])  # each answer: version and time
    assert correction["value"] == case.last_answer  # the correction box is pre-filled with the answer
    assert "v1" in status["value"] and question_box["value"] == ""
    with store.session() as s:
        turns = st.conversation_history(s, case.conversation_id)
        assert len(turns) == 1 and turns[0].answer == case.last_answer and len(turns[0].image_hashes) == 1
        assert turns[0].model_version_id == st.active_version(s).id
    from annotation_db.export import frames

    with store.session() as s:
        row = frames(s)["turns"].iloc[0]
    assert row["context"] == {"age": 54, "sex": "female", "body_site": "back", "fitzpatrick": "III", "modality": "clinical"}
    assert row["latency_s"] > 0 and row["settings"]["max_new_tokens"] == 8 and row["user_role"] == "expert"
    stored = list((ctx.settings.images_dir).rglob("*.png"))
    assert len(stored) == 1 and "a.png" not in stored[0].name  # content-addressed, no file name kept


def test_a_follow_up_reuses_the_cases_cached_keys_and_values(ctx, tmp_path, tiny_engine):
    consult, case = Consult(ctx), Case()
    files = [save_png(tmp_path / "a.png")]
    ask(consult, case, files, "What is this lesion?")
    assert case.cache_key is not None and case.cache_key in tiny_engine.kv_cache
    ask(consult, case, files, "Is it dangerous?")
    assert tiny_engine.kv_cache.stats.hits == 1 and tiny_engine.kv_cache.stats.reused_tokens > 0
    assert consult.new_case()[1].cache_key is None  # a new case starts its own


def test_follow_up_continues_the_case_with_the_same_images(ctx, tmp_path, store):
    consult, case = Consult(ctx), Case()
    files = [save_png(tmp_path / "a.png")]
    ask(consult, case, files, "What is this lesion?")
    first = case.conversation_id
    messages = ask(consult, case, files, "Is it dangerous?", age=99)[-1][0]  # same upload still in the box
    assert case.conversation_id == first and len(messages) == 5 and len(case.turns) == 2  # image, q, a, q, a
    assert [type(m["content"]).__name__ for m in messages] == ["dict", "str", "str", "str", "str"]  # not shown twice
    assert case.turns[1].image_hashes == []  # the image belongs to the first turn; not sent twice
    with store.session() as s:
        history = st.conversation_history(s, first)
    assert [t.seq for t in history] == [0, 1]
    assert case.context == {}  # context is taken when the case starts; later edits do not rewrite it
    new = consult.new_case()
    assert new[0] == [] and new[1].conversation_id is None


def test_stop_keeps_the_partial_answer_marked_stopped(tiny_model_dir, tiny_engine, store, tmp_path):
    settings = Settings.from_env(model=str(tiny_model_dir), max_new_tokens=400)
    ctx = Ctx(attach(settings, tiny_engine, store), AuthConfig.local(), DemoOptions())
    consult, case = Consult(ctx), Case()
    stream = consult.ask({"case": case, "files": [save_png(tmp_path / "a.png")], "question": "Describe it"}, req(session="tab"))
    next(stream)  # the placeholder
    next(stream)  # the first chunk
    consult.stop(req(session="tab"))
    outs = list(stream)
    messages = outs[-1][0]
    assert "stopped" in messages[-1]["content"]
    from annotation_db.export import frames

    with store.session() as s:
        row = frames(s)["turns"].iloc[0]
    assert row["status"] == "stopped" and row["completion_tokens"] < 400


def test_a_client_gone_mid_answer_stops_the_generation_and_records_it_stopped(tiny_model_dir, tiny_engine, store, tmp_path):
    """Gradio closes the handler's generator (GeneratorExit) when the browser goes away mid-answer."""
    import time

    settings = Settings.from_env(model=str(tiny_model_dir), max_new_tokens=2000)
    ctx = Ctx(attach(settings, tiny_engine, store), AuthConfig.local(), DemoOptions())
    consult, case = Consult(ctx), Case()
    stream = consult.ask({"case": case, "files": [save_png(tmp_path / "a.png")], "question": "Describe it"}, req(session="gone"))
    next(stream)  # the placeholder
    next(stream)  # the first chunk
    start = time.perf_counter()
    stream.close()
    assert not tiny_engine._lock.locked(), "the engine is still busy with an answer nobody will read"
    assert time.perf_counter() - start < 10 and consult._running == {}
    from annotation_db.export import frames

    with store.session() as s:
        turns = frames(s)["turns"]
    assert len(turns) == 1
    row = turns.iloc[0]
    assert row["status"] == "stopped" and row["completion_tokens"] < 2000 and row["question"] == "Describe it"


def test_thumbs_from_anyone_and_full_ratings_only_from_raters(ctx, tmp_path, store):
    consult, case = Consult(ctx), Case()
    ask(consult, case, [save_png(tmp_path / "a.png")], "What is this?", who="cara")
    like = SimpleNamespace(index=2, value=None, liked=True)  # the answer: after the image and the question
    assert "saved" in consult.like(case, like, req("cara"))
    with pytest.raises(gr.Error, match="only an answer"):
        consult.like(case, SimpleNamespace(index=0, value=None, liked=False), req("cara"))
    with pytest.raises(gr.Error, match="clinician"):
        consult.rate(case, 4, "a better answer", "", [], "", req("cara"))
    assert counts(store)["ratings"] == 1
    # An expert's rating: the rater is the signed-in user; an unchanged pre-filled correction is no correction.
    case.owner = "eve"  # one page shared between users here; the app binds a page to one (test_security)
    msg = consult.rate(case, 4, case.last_answer, "nevus", ["incomplete"], "ok", req("eve"))
    assert "saved" in msg and "correction" not in msg
    msg = consult.rate(case, 2, "Benign naevus; reassure.", "", [], "", req("eve"))
    assert "with your correction" in msg
    from annotation_db.export import frames

    with store.session() as s:
        ratings = frames(s)["ratings"]
    assert list(ratings["kind"]) == ["thumbs", "full", "full"]
    assert pd.isna(ratings["correction"].iloc[1]) and ratings["correction"].iloc[2] == "Benign naevus; reassure."
    assert ratings["diagnosis"].iloc[1] == "nevus" and list(ratings["flags"].iloc[1]) == ["incomplete"]
    with pytest.raises(gr.Error, match="score"):
        consult.rate(case, None, "", "", [], "", req("eve"))
    with pytest.raises(gr.Error, match="ask a question first"):
        consult.rate(Case(), 3, "", "", [], "", req("eve"))
    with pytest.raises(gr.Error, match="sign in"):
        consult.rate(case, 3, "", "", [], "", req(None))


def _bomb(path: Path) -> str:
    from PIL import Image

    Image.new("1", (12_000, 12_000)).save(path)  # 144 MP, a few KB on disk
    return str(path)


@pytest.mark.parametrize(
    "case_name, make_files, question, context, message",
    [
        ("not an image", lambda d: [str(_write(d / "notes.png", b"patient notes, not pixels"))], "What is it?", {}, "not an image"),
        ("corrupt image", lambda d: [str(_write(d / "broken.png", _png_bytes()[:60]))], "What is it?", {}, "truncated|corrupt|not an image"),
        ("empty file", lambda d: [str(_write(d / "empty.png", b""))], "What is it?", {}, "empty"),
        ("enormous image", lambda d: [_bomb(d / "huge.png")], "What is it?", {}, "too large"),
        ("too many images", lambda d: [save_png(d / f"{i}.png") for i in range(5)], "What is it?", {}, "at most 4"),
        ("empty question", lambda d: [save_png(d / "a.png")], "   ", {}, "empty"),
        ("100 000 characters", lambda d: [save_png(d / "a.png")], "x" * 100_000, {}, "100,000 characters"),
        ("impossible age", lambda d: [save_png(d / "a.png")], "What is it?", {"age": 300}, "age"),
        ("unknown Fitzpatrick type", lambda d: [save_png(d / "a.png")], "What is it?", {"fitzpatrick": "VII"}, "Fitzpatrick"),
        ("unknown template", lambda d: [save_png(d / "a.png")], "What is it?", {"template": "nope"}, "template"),
    ],
)
def test_bad_input_gives_a_clear_message_and_stores_nothing(ctx, tmp_path, store, case_name, make_files, question, context, message):
    consult, case = Consult(ctx), Case()
    with pytest.raises(gr.Error, match=message):
        ask(consult, case, make_files(tmp_path), question, **context)
    assert counts(store) == {"turns": 0, "ratings": 0}
    assert not list(ctx.settings.images_dir.rglob("*.png")) if ctx.settings.images_dir.exists() else True
    assert case.conversation_id is None and case.messages == []
    # ... and the app keeps serving: the next good question works.
    ask(consult, case, [save_png(tmp_path / "ok.png")], "What is it?")
    assert counts(store)["turns"] == 1


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    draw_lesion().save(buf, format="PNG")
    return buf.getvalue()


def test_api_handlers_ask_follow_up_rate_and_refuse(ctx, tmp_path, store):
    consult = Consult(ctx)
    answer, cid, tid, version = consult.api_ask([save_png(tmp_path / "a.png")], "What is it?", '{"age": 40, "body_site": "arm"}', "", req("eve"))
    assert version == "v1" and cid >= 1 and tid >= 1
    _, cid2, tid2, _ = consult.api_ask([], "And the treatment?", "", str(cid), req("eve"))
    assert cid2 == cid and tid2 != tid
    with pytest.raises(gr.Error, match="another user"):
        consult.api_ask([], "Let me see", "", str(cid), req("max"))
    rating_id = consult.api_rate(tid, 5, "", "", "", req("max"))
    assert rating_id >= 1
    for bad, msg in [((tid, 9, "", "", ""), "1 to 5"), ((999, 3, "", "", ""), "no turn"), (("x", 3, "", "", ""), "turn id")]:
        with pytest.raises(gr.Error, match=msg):
            consult.api_rate(*bad, req("max"))
    with pytest.raises(gr.Error, match="clinician"):
        consult.api_rate(tid, 3, "", "", "", req("cara"))
    for ctx_text, msg in [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ('{"colour": "red"}', "unknown context")]:
        with pytest.raises(gr.Error, match=msg):
            consult.api_ask([save_png(tmp_path / "a.png")], "What?", ctx_text, "", req("eve"))
    assert counts(store) == {"turns": 2, "ratings": 1}


# ----------------------------------------------------------------------------- review


def test_review_queue_one_at_a_time_blind_skip_and_refused_for_clinicians(ctx, tmp_path, store):
    consult = Consult(ctx)
    for i, who in enumerate(("eve", "cara", "cara")):
        ask(consult, Case(), [save_png(tmp_path / f"{i}.png", draw_lesion(colour=(40 * i, 60, 40)))], f"Question {i}?", who=who)
    review, state = Review(ctx), ReviewState()
    out = review.load(state, False, req("max"))
    assert "**3** answers left" in out[1] and len(out[2]) == 1 and "Question 0?" in out[4] and "v1" in out[6]
    assert out[8] == state.answer  # correction pre-filled with the model's answer
    first = state.turn_id
    out = review.skip(state, True, req("max"))
    assert state.turn_id != first and "1 skipped" in out[1] and "hidden" in out[6] and "v1" not in out[6]
    out = review.save(state, True, 3, "A corrected answer.", "psoriasis", ["wrong_diagnosis"], "", req("max"))
    assert "saved" in out[-1] and "**2** answers left" in out[1]
    out = review.save(state, True, 4, state.answer, "", [], "", req("max"))
    assert "Only skipped" in out[4]
    # eve asked the first question: her own answer is not in her queue; the others are.
    out = review.load(ReviewState(), False, req("eve"))
    assert "**2** answers left" in out[1]
    with pytest.raises(gr.Error, match="clinician"):
        review.load(ReviewState(), False, req("cara"))
    with pytest.raises(gr.Error, match="no answer on screen"):
        review.save(ReviewState(), False, 3, "", "", [], "", req("max"))


def test_review_shows_an_answer_whose_image_file_is_missing_and_skip_gets_past_it(ctx, tmp_path):
    consult = Consult(ctx)
    for i in range(2):
        ask(consult, Case(), [save_png(tmp_path / f"{i}.png", draw_lesion(colour=(80 * i, 60, 40)))], f"Question {i}?", who="cara")
    from core.images import image_path

    with ctx.store.session() as s:
        hashes = [t.image_hashes for t in st.conversation_history(s, 1)]
    image_path(ctx.settings.images_dir, hashes[0][0]).unlink()  # the first question's image is lost
    review, state = Review(ctx), ReviewState()
    out = review.load(state, False, req("max"))
    assert "Question 0?" in out[4] and "missing" in out[4] and out[2] == [] and state.turn_id is not None
    out = review.skip(state, False, req("max"))
    assert "Question 1?" in out[4] and "missing" not in out[4] and len(out[2]) == 1


# ---------------------------------------------------------------------------- insights


def test_exports_replace_the_sessions_previous_export_instead_of_piling_up(ctx, tmp_path, monkeypatch):
    import tempfile

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    insights = Insights(ctx)
    first = insights.export("csv", req("eve"))
    second = insights.export("jsonl", req("eve"))
    folders = {p.parent for p in temp.rglob("*") if p.is_file()}
    assert len(folders) == 1, folders  # two exports, one folder
    assert {Path(f).name for f in second} == {p.name for p in temp.rglob("*") if p.is_file()}
    assert not any(Path(f).exists() for f in first)  # the earlier export of this session is gone
    other = insights.export("csv", req("max", session="s2"))  # another session's download is left alone
    assert all(Path(f).exists() for f in second + other)
    del insights  # the app's export folder goes with it
    import gc

    gc.collect()
    assert list(temp.iterdir()) == []


def test_insights_figures_export_and_admin_only_rollback(ctx, tmp_path, store):
    consult = Consult(ctx)
    case = Case()
    ask(consult, case, [save_png(tmp_path / "a.png")], "What is it?", who="cara")
    case.owner = "eve"  # one page shared between users here; the app binds a page to one (test_security)
    consult.rate(case, 2, "Better.", "eczema", ["hallucination"], "", req("eve"))
    case.owner = "max"
    consult.rate(case, 4, "", "eczema", [], "", req("max"))
    insights = Insights(ctx)
    d = insights.data()
    row = d["table"].set_index("version").loc["v1"]
    assert row["answers"] == 1 and row["mean_score"] == 3.0 and row["share_corrected"] == 0.5
    assert set(d["shares"]["measure"]) >= {"corrected", "hallucination"}
    assert list(d["scores"]["version"]) == ["v1"] and len(d["trend"]) == 1
    assert dict(zip(d["agreement"]["measure"], d["agreement"]["value"]))["units"] == 1
    outs = insights.refresh(req("cara"))  # everyone may look
    assert "**1** answers recorded" in outs[-1] and outs[-2]["interactive"] is False
    for fmt in ("csv", "jsonl", "parquet"):
        files = insights.export(fmt, req("eve"))
        names = {re.sub(r"^dermaloop-export-\d+-[0-9a-f]{16}-", "", Path(f).name) for f in files}  # signed (test_security)
        assert names == {f"{t}.{fmt}" for t in ("turns", "ratings", "gold_pairs", "preference_pairs", "pairwise")}
    with pytest.raises(gr.Error, match="clinician"):
        insights.export("csv", req("cara"))
    with pytest.raises(gr.Error, match="format"):
        insights.export("xlsx", req("eve"))
    with store.session() as s:  # a refine run that produced v2, as training.refine records it
        run = st.start_training_run(s, {"method": "sft"})
        decision = {"promote": True, "forced": False, "reason": "passed the gate: rougeL 0.1 -> 0.3",
                    "metric": "rougeL", "candidate": 0.3, "active": 0.1}
        st.finish_training_run(s, run.id, status="completed", counts={"gold": 1, "synthetic": 4},
                               report={"outcome": "promoted", "decision": decision})
        v2 = st.register_version(s, base_model=ctx.settings.model, training_run_id=run.id, status="active").name
    assert ctx.runtime.sync(force=True) == v2
    d = insights.data()
    assert d["runs"].iloc[0][["version", "outcome", "gate metric", "candidate"]].tolist() == [v2, "promoted", "rougeL", 0.3]
    assert "gold: 1" in d["runs"].iloc[0]["pairs"] and sorted(d["run_points"]["series"]) == ["active", "candidate"]
    with pytest.raises(gr.Error, match="only admins"):
        insights.rollback("v1", "", req("eve"))
    assert "v1 is active again" in insights.rollback("v1", "worse answers", req("ada"))
    assert ctx.runtime.version == "v1"
    with store.session() as s:
        assert st.get_version(s, v2).status.value == "retired"  # a rollback retires the version it replaces


# ---------------------------------------------------------------------------- hot swap


def test_a_newly_promoted_version_answers_the_next_question(ctx, tmp_path, store, tiny_adapter_dir):
    consult, case = Consult(ctx), Case()
    ask(consult, case, [save_png(tmp_path / "a.png")], "What is it?")
    assert "model v1" in case.messages[-1]["content"]
    with store.session() as s:
        cand = st.register_version(s, base_model=ctx.settings.model, adapter_path=str(tiny_adapter_dir),
                                   parent_id=st.active_version(s).id)
        st.promote(s, cand.id, reason="better on the held-out set")
    ask(consult, case, [], "And now?")  # a follow-up in the same case: the new version answers it
    assert "model v2" in case.messages[-1]["content"]
    with store.session() as s:
        history = st.conversation_history(s, case.conversation_id)
        assert [st.get_version(s, t.model_version_id).name for t in history] == ["v1", "v2"]
    assert ctx.runtime.engine.versions["v2"] == str(tiny_adapter_dir)


def test_a_broken_active_version_keeps_the_current_one_serving(ctx, tmp_path, store):
    with store.session() as s:
        st.register_version(s, base_model=ctx.settings.model, adapter_path=str(tmp_path / "missing"), status="active")
    assert ctx.runtime.sync(force=True) == "v1"
    consult, case = Consult(ctx), Case()
    ask(consult, case, [save_png(tmp_path / "a.png")], "Still answering?")
    assert "model v1" in case.messages[-1]["content"]


def test_zerogpu_generation_runs_inside_spaces_gpu_with_picklable_arguments(settings, tiny_engine, store, tmp_path, monkeypatch):
    """ZeroGPU pickles arguments and results across a process boundary; a fake `spaces` does the same."""
    import pickle
    import sys

    calls: list = []

    class FakeSpaces:
        @staticmethod
        def GPU(duration=None):
            def decorate(fn):
                def run(*args, **kwargs):
                    args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
                    calls.append(duration)
                    for item in fn(*args, **kwargs):
                        yield pickle.loads(pickle.dumps(item))
                return run
            return decorate

    monkeypatch.setitem(sys.modules, "spaces", FakeSpaces)
    options = DemoOptions(poll_s=0)
    ctx = Ctx(attach(settings, tiny_engine, store, options, zerogpu=True), AuthConfig.local(), options)
    consult, case = Consult(ctx), Case()
    ask(consult, case, [save_png(tmp_path / "a.png")], "What is it?", age=30)
    ask(consult, case, [], "And then?")  # history with images crosses the boundary too
    assert calls == [120, 120] and "model v1" in case.messages[-1]["content"]
    assert counts(store)["turns"] == 2
