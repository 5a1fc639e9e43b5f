"""Dynamic batching (core/scheduler.py): questions asked together share one generate, and each
clinician gets their own answer, the one they would get alone, streamed and stoppable on its own."""

import threading

import pytest

from core.config import GenerationSettings, Settings
from core.engine import Engine
from core.models import load_model
from core.prompts import ChatTurn
from core.scheduler import Scheduler

from conftest import draw_lesion

QUESTIONS = ["What is this lesion?", "Is it dangerous?", "A somewhat longer question about the border and colour?", "Size?"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(load_model(tiny_model_dir), Settings.from_env(max_new_tokens=16))


def _ask_together(scheduler, requests):
    """Submit every request before the scheduler's window closes; stream each in its own thread."""
    handles = [scheduler.submit(images, question, history=history) for images, question, history in requests]
    texts: dict[int, str] = {}

    def read(i):
        texts[i] = "".join(handles[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return handles, [texts[i].strip() for i in range(len(handles))]


def test_questions_asked_together_are_one_batch_with_each_answer_as_alone(engine):
    requests = [([draw_lesion(colour=(40 * i, 90, 60))], q, []) for i, q in enumerate(QUESTIONS)]
    alone = [engine.answer(images, q).text for images, q, _ in requests]
    scheduler = Scheduler(engine, max_batch=8, window_s=0.5)
    handles, streamed = _ask_together(scheduler, requests)
    assert scheduler.stats.batches == 1 and scheduler.stats.largest_batch == 4
    assert [h.result.text for h in handles] == alone == streamed
    assert all(h.result.status == "complete" and h.result.ttft_s is not None for h in handles)
    assert [h.position for h in handles] == [0, 1, 2, 3]  # at submission


def test_followups_with_history_batch_too(engine):
    img = draw_lesion()
    first = engine.answer([img], "What is this lesion?")
    history = [ChatTurn("What is this lesion?", first.text, [img])]
    requests = [([], "Is it dangerous?", history), ([], "Should it be removed?", history)]
    alone = [engine.answer([], q, history=h).text for _, q, h in requests]
    scheduler = Scheduler(engine, window_s=0.5)
    handles, streamed = _ask_together(scheduler, requests)
    assert scheduler.stats.largest_batch == 2 and streamed == alone


def test_incompatible_requests_wait_for_the_next_batch(engine):
    scheduler = Scheduler(engine, max_batch=2, window_s=0.5)
    img = draw_lesion()
    handles = [scheduler.submit([img], "What is it?"), scheduler.submit([], "What is psoriasis?"),
               scheduler.submit([img], "Is it benign?"), scheduler.submit([img], "Describe it.")]
    assert [h.position for h in handles] == [0, 1, 2, 3]
    results = [h.wait() for h in handles]
    assert scheduler.stats.batches == 3 and scheduler.stats.largest_batch == 2
    assert results[1].text == engine.answer([], "What is psoriasis?").text
    assert results[3].text == engine.answer([img], "Describe it.").text
    assert scheduler.estimated_wait_s(handles[3]) >= 0


def test_one_clinician_stops_without_disturbing_the_others(engine):
    gen = GenerationSettings(max_new_tokens=200, repetition_penalty=1.0)
    imgs = [draw_lesion(colour=(200, 30 * i, 30)) for i in range(3)]
    alone = [engine.answer([im], "Describe it.", generation=gen).text for im in imgs]
    scheduler = Scheduler(engine, window_s=0.5)
    handles = [scheduler.submit([im], "Describe it.", generation=gen) for im in imgs]
    handles[1].stop()
    results = [h.wait() for h in handles]
    assert results[1].status == "stopped" and results[1].completion_tokens < 200
    assert [results[0].text, results[2].text] == [alone[0], alone[2]]


def test_bad_input_fails_at_submit(engine):
    from core.errors import InputError

    with pytest.raises(InputError, match="empty"):
        Scheduler(engine).submit([draw_lesion()], "  ")
