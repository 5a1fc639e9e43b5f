"""The image-feature cache (core/features.py): an image goes through the vision tower once, by content,
and greedy answers are the same tokens with and without the cache, alone and batched.

    python -m pytest -q tests/test_features.py
"""

import pytest
from test_kv_cache import count_vision_rows, rows_of

from core.config import Settings
from core.engine import Engine
from core.models import load_model
from core.prompts import ChatTurn
from core.scheduler import Scheduler

from conftest import draw_lesion

QUESTIONS = ["What is this lesion?", "Is it dangerous?", "Describe the border.", "Size?"]


@pytest.fixture(scope="module")
def images():
    return [draw_lesion(size=(200, 90)), draw_lesion(colour=(30, 160, 40)), draw_lesion(size=(70, 120), colour=(90, 40, 120))]


def _engine(model_dir, mb: int, splitting: str = "on") -> Engine:
    return Engine(load_model(model_dir, image_splitting=splitting), Settings.from_env(max_new_tokens=16, feature_cache_mb=mb))


@pytest.fixture(scope="module")
def without(tiny_model_dir):
    return _engine(tiny_model_dir, 0)


@pytest.fixture
def cached(tiny_model_dir):
    engine = _engine(tiny_model_dir, 64)
    assert engine.features_supported
    return engine


def test_same_answers_and_each_image_encoded_once_across_conversations(without, cached, images):
    rows = count_vision_rows(cached.model)
    asks = [([images[0]], QUESTIONS[0]), ([images[0], images[1]], QUESTIONS[1]), ([images[1]], QUESTIONS[2]), ([images[0]], QUESTIONS[3])]
    expected = [without.answer(imgs, q).text for imgs, q in asks]
    got = [cached.answer(imgs, q).text for imgs, q in asks]  # four conversations, two distinct images
    assert got == expected and all(got)
    assert rows["rows"] == rows_of(cached, images[:2])  # each image's tiles once
    assert cached.features.stats.encoded == 2 and cached.features.stats.hits == 3


def test_prepare_at_upload_leaves_nothing_to_encode_at_the_question(without, cached, images):
    rows = count_vision_rows(cached.model)
    assert cached.prepare(images[:2]) == 2 and cached.prepare(images[:2]) == 0
    encoded = rows["rows"]
    assert encoded == rows_of(cached, images[:2]) and cached.features.stats.tower_calls == 1  # both in one call
    history = [ChatTurn(QUESTIONS[0], without.answer([images[0]], QUESTIONS[0]).text, [images[0]])]
    assert cached.answer([images[0]], QUESTIONS[0]).text == history[0].answer
    follow = cached.answer([images[1]], "And this one?", history=history, conversation="case")
    assert follow.text == without.answer([images[1]], "And this one?", history=history).text
    assert rows["rows"] == encoded  # the questions ran no image through the tower


def test_a_batch_encodes_its_new_images_in_one_call_with_the_answers_alone(without, cached, images):
    asks = [([images[i]], QUESTIONS[i]) for i in range(3)]
    alone = [without.answer(imgs, q).text for imgs, q in asks]
    scheduler = Scheduler(cached, window_s=0.5)
    handles = [scheduler.submit(imgs, q) for imgs, q in asks]
    assert [h.wait().text for h in handles] == alone
    assert scheduler.stats.largest_batch == 3 and cached.features.stats.tower_calls == 1
    without_scheduler = Scheduler(without, window_s=0.5)  # and batched without the cache: the same
    assert [h.wait().text for h in [without_scheduler.submit(imgs, q) for imgs, q in asks]] == alone
    scheduler.close()
    without_scheduler.close()


def test_a_budget_too_small_evicts_and_answers_stay_the_same(tiny_model_dir, without, images):
    both = _engine(tiny_model_dir, 64)
    both.prepare(images[:2])
    tiny = _engine(tiny_model_dir, 1)
    tiny.features.budget_bytes = both.features.nbytes - 1  # room for either image's features, not both
    asks = [([images[i % 2]], QUESTIONS[i]) for i in range(4)]
    assert [tiny.answer(imgs, q).text for imgs, q in asks] == [without.answer(imgs, q).text for imgs, q in asks]
    assert tiny.features.stats.evictions >= 2 and len(tiny.features) == 1


def test_without_splitting_too(tiny_model_dir, images):
    plain, cached = _engine(tiny_model_dir, 0, "off"), _engine(tiny_model_dir, 64, "off")
    for imgs in ([images[2]], images[:2]):
        assert cached.answer(imgs, "What is it?").text == plain.answer(imgs, "What is it?").text
    assert cached.prepare(images) == 0 and cached.features.stats.encoded == 3  # all seen already
    assert cached.prepare([draw_lesion(colour=(10, 20, 200)), images[0]]) == 1  # only the new one


def test_a_question_during_its_uploads_encoding_waits_for_it_instead_of_encoding_again(tiny_model_dir, without, images):
    import threading
    import time

    engine = _engine(tiny_model_dir, 64)
    tower = next(m for name, m in engine.model.named_modules() if name.endswith("vision_model"))
    tower.register_forward_pre_hook(lambda *_: time.sleep(1.0))  # a slow encoding, as on CPU with image splitting
    upload = threading.Thread(target=engine.prepare, args=([images[2]],))
    upload.start()
    while not engine.features._pending:  # the upload's encoding has begun
        time.sleep(0.01)
    answer = engine.answer([images[2]], QUESTIONS[0])
    upload.join()
    assert answer.text == without.answer([images[2]], QUESTIONS[0]).text
    assert engine.features.stats.tower_calls == 1 and engine.features.stats.encoded == 1
