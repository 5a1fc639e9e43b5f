"""Clinicians asking at once (demo.runtime + core/scheduler.py): their questions are answered in one
batch with the answers each would get alone, a question that has to wait says where it stands in line,
and rating never waits behind generation.

    python -m pytest -q tests/test_demo_queue.py
"""

import threading
import time

import pytest

from core.config import Settings
from core.engine import Engine
from core.models import load_model
from demo.consult import Case, Consult
from demo.runtime import queue_note

from conftest import USERS, ask, draw_lesion, req, save_png

QUESTIONS = ["What is this lesion?", "Does it need a biopsy?"]


@pytest.fixture(scope="module")
def gated(tiny_model_dir):
    """A tiny engine whose generation waits while `gate` is clear (so a test can hold an answer under way)."""
    loaded = load_model(tiny_model_dir)
    gate = threading.Event()
    gate.set()

    def generate(**kwargs):
        assert gate.wait(30), "the test never opened the gate"
        return loaded.model.generate(**kwargs)

    engine = Engine(loaded, Settings.from_env(model=str(tiny_model_dir), max_new_tokens=8), generate_fn=generate)
    return engine, gate


@pytest.fixture
def consult(gated, tiny_model_dir, store):
    from demo.auth import AuthConfig, UserEntry
    from demo.common import Ctx
    from demo.runtime import DemoOptions, attach

    engine, gate = gated
    settings = Settings.from_env(model=str(tiny_model_dir), max_new_tokens=8)
    auth = AuthConfig(mode="password", users={n: UserEntry(r, "$2b$04$x") for n, r in USERS.items()})
    options = DemoOptions(review_need=2, poll_s=0)
    runtime = attach(settings, engine, store, options)
    assert runtime.scheduler is not None and runtime.generation_slots(options.concurrency) == 2 * settings.max_batch
    runtime.scheduler.window_s = 0.5  # questions asked by two threads land in one batch
    yield Consult(Ctx(runtime, auth, options))
    gate.set()
    runtime.scheduler.close()


@pytest.fixture
def files(tmp_path):
    return [save_png(tmp_path / f"lesion-{i}.png", draw_lesion(colour=(60 + 70 * i, 80, 50))) for i in range(2)]


def _in_threads(*calls):
    out = [None] * len(calls)

    def run(i):
        out[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_two_clinicians_at_once_are_one_batch_with_their_answers_alone(consult, files):
    alone = []
    for i, q in enumerate(QUESTIONS):
        case = Case()
        ask(consult, case, [files[i]], q, who="cara", session=f"alone-{i}")
        alone.append(case.last_answer)
    scheduler = consult.ctx.runtime.scheduler
    batches = scheduler.stats.batches
    cases = [Case(), Case()]
    _in_threads(*[lambda i=i: ask(consult, cases[i], [files[i]], QUESTIONS[i], who="cara", session=f"together-{i}")
                  for i in range(2)])
    assert scheduler.stats.batches == batches + 1 and scheduler.stats.largest_batch == 2
    assert [c.last_answer for c in cases] == alone
    assert all(c.last_turn_id is not None for c in cases)


def test_the_api_batches_too_with_the_same_answers(consult, files):
    who = req("cara", "api")
    alone = [consult.api_ask([files[i]], q, "", "", who) for i, q in enumerate(QUESTIONS)]
    scheduler = consult.ctx.runtime.scheduler
    batches = scheduler.stats.batches
    together = _in_threads(*[lambda i=i: consult.api_ask([files[i]], QUESTIONS[i], "", "", req("cara", f"api-{i}"))
                             for i in range(2)])
    assert [t[0] for t in together] == [a[0] for a in alone] and scheduler.stats.batches == batches + 1
    # a follow-up of a conversation answered alone finds its cached keys/values (and runs alone)
    hits = consult.ctx.runtime.engine.kv_cache.stats.hits
    consult.api_ask([], "Is it dangerous?", "", str(alone[0][1]), who)
    assert consult.ctx.runtime.engine.kv_cache.stats.hits == hits + 1


def test_a_waiting_clinician_sees_their_place_and_the_answer_follows(consult, gated, files):
    engine, gate = gated
    gate.clear()
    first = threading.Thread(target=ask, args=(consult, Case(), [files[0]], QUESTIONS[0]), kwargs={"who": "cara", "session": "a"})
    first.start()
    deadline = time.monotonic() + 20
    while not engine._lock.locked() and time.monotonic() < deadline:  # the first answer is under way
        time.sleep(0.02)
    case = Case()
    outputs = consult.ask({"case": case, "files": [files[1]], "question": QUESTIONS[1], "template": "free"}, req("max", "b"))
    notes = []
    for messages, _, _, _, status in outputs:
        note = status.get("value") if isinstance(status, dict) else None
        if note and "in line" in note:
            notes.append(note)
            assert messages[-1]["content"] == f"_{note}_"  # shown where the answer will appear
            gate.set()
    first.join(30)
    assert notes and notes[0] == "2nd in line"  # behind the answer under way; no batch timed yet, so no estimate
    assert case.last_turn_id is not None and case.last_answer  # then it was answered


def test_rating_completes_while_an_answer_is_generating(consult, gated, files):
    engine, gate = gated
    case = Case()
    ask(consult, case, [files[0]], QUESTIONS[0], who="eve", session="rated")
    gate.clear()
    running = threading.Thread(target=ask, args=(consult, Case(), [files[1]], QUESTIONS[1]), kwargs={"who": "cara", "session": "busy"})
    running.start()
    deadline = time.monotonic() + 20
    while not engine._lock.locked() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine._lock.locked()
    message = consult.rate(case, 4, "A seborrhoeic keratosis.", "seborrheic keratosis", [], "", req("eve", "rated"))
    rating_id = consult.api_rate(case.last_turn_id, 2, "", "", "", req("max", "rater-api"))
    assert engine._lock.locked() and running.is_alive(), "the answer should still be generating"
    assert "saved" in message.lower() and rating_id > 0
    gate.set()
    running.join(30)


@pytest.mark.parametrize("place, wait_s, note", [(1, 0.0, "1st in line"), (2, 19.6, "2nd in line, about 20 s"),
                                                 (3, 0.2, "3rd in line, about 1 s"), (12, 600, "12th in line, about 10 min")])
def test_queue_note(place, wait_s, note):
    assert queue_note(place, wait_s) == note


def test_an_upload_is_encoded_before_the_question(consult, gated, tmp_path):
    engine, _ = gated
    upload = save_png(tmp_path / "upload.png", draw_lesion(colour=(150, 120, 30), size=(120, 90)))
    encoded = engine.features.stats.encoded
    cleaned = consult.clean_uploads([upload], req("cara", "up"))
    consult.ctx.runtime._preparer.submit(lambda: None).result(30)  # one worker: the upload's encoding has finished
    assert engine.features.stats.encoded == encoded + 1
    hits = engine.features.stats.hits
    case = Case()
    ask(consult, case, cleaned, QUESTIONS[0], who="cara", session="up")
    assert case.last_answer and engine.features.stats.encoded == encoded + 1 and engine.features.stats.hits == hits + 1
