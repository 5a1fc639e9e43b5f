"""The conversation prefix cache (core/kv_cache.py): follow-ups give the same tokens as a full encoding,
run only new images through the vision tower, and survive version switches and eviction."""

import pytest
from test_engine import _make_adapter

from core.config import Settings
from core.engine import Engine
from core.kv_cache import IMAGE_AXIS
from core.models import load_model
from core.prompts import ChatTurn, ClinicalContext

from conftest import draw_lesion

QUESTIONS = [("What is this lesion?", "first"), ("Is it dangerous?", None), ("And this one?", "second"), ("Compare the two.", None)]


def count_vision_rows(model) -> dict:
    """Counts the image rows (images, or tiles of them) the vision tower encodes."""
    tower = next(m for name, m in model.named_modules() if name.endswith(("vision_model", "vision_tower")))
    counter = {"rows": 0}

    def pre(module, args, kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        counter["rows"] += int(pixels.shape[0])

    tower.register_forward_pre_hook(pre, with_kwargs=True)
    return counter


def rows_of(engine, images) -> int:
    """How many image rows the processor makes of `images`."""
    pixels = engine._encode([[ChatTurn("x", None, list(images))]])["pixel_values"]
    return int(pixels.shape[IMAGE_AXIS[engine.info.model_type]])


def _conversation(engine, images, conversation):
    """Ask QUESTIONS in turn (images named "first"/"second"), each answer going into the history."""
    history, answers = [], []
    for question, image in QUESTIONS:
        given = [images[image]] if image else []
        context = ClinicalContext(age=52, body_site="back") if not history else None
        answer = engine.answer(given, question, history=history, context=context, conversation=conversation)
        answers.append(answer)
        history.append(ChatTurn(question, answer.text, given, context))
    return answers


@pytest.fixture(scope="module")
def images():
    return {"first": draw_lesion(size=(200, 90)), "second": draw_lesion(colour=(30, 160, 40))}


@pytest.mark.parametrize("family", ["smolvlm", "llava"])
def test_follow_ups_match_full_encoding_and_encode_each_image_once(family, tiny_model_dir, tiny_llava_dir, images):
    model_dir = tiny_model_dir if family == "smolvlm" else tiny_llava_dir
    settings = Settings.from_env(max_new_tokens=16)
    full = Engine(load_model(model_dir, image_splitting="on"), Settings.from_env(max_new_tokens=16, feature_cache_mb=0))
    cached = Engine(load_model(model_dir, image_splitting="on"), settings)
    assert cached.kv_cache_supported
    full_rows, cached_rows = count_vision_rows(full.model), count_vision_rows(cached.model)
    expected = _conversation(full, images, conversation=None)
    got = _conversation(cached, images, conversation="case-1")
    assert [a.text for a in got] == [a.text for a in expected]
    assert all(a.completion_tokens > 0 for a in got)
    assert [a.prompt_tokens for a in got] == [a.prompt_tokens for a in expected]  # the whole prompt, reused or not
    assert cached.kv_cache.stats.hits == 3 and cached.kv_cache.stats.reused_tokens > 0
    # Full encoding re-encodes the first image at every turn; the cache encodes each image once.
    assert cached_rows["rows"] == rows_of(cached, [images["first"], images["second"]]) < full_rows["rows"]


def test_stream_with_a_conversation_equals_answer(tiny_model_dir, images):
    engine = Engine(load_model(tiny_model_dir), Settings.from_env(max_new_tokens=16))
    first = engine.answer([images["first"]], "What is this lesion?", conversation="a")
    history = [ChatTurn("What is this lesion?", first.text, [images["first"]])]
    expected = engine.answer([], "Is it dangerous?", history=history).text
    gen = engine.stream([], "Is it dangerous?", history=history, conversation="a")
    assert "".join(gen).strip() == expected == gen.result.text
    assert engine.kv_cache.stats.hits == 1


def test_version_switch_drops_the_reuse_and_answers_as_the_new_version(tiny_model_dir, tmp_path, images):
    engine = Engine(load_model(tiny_model_dir), Settings.from_env(max_new_tokens=16))
    engine.add_adapter("v2", _make_adapter(tiny_model_dir, tmp_path / "v2", seed=1))
    first = engine.answer([images["first"]], "What is this lesion?", version="v2", conversation="c")
    history = [ChatTurn("What is this lesion?", first.text, [images["first"]])]
    base_expected = engine.answer([], "Is it dangerous?", history=history).text
    v2_expected = engine.answer([], "Is it dangerous?", history=history, version="v2").text
    assert base_expected != v2_expected  # else the test could not tell the versions apart
    after_switch = engine.answer([], "Is it dangerous?", history=history, conversation="c")
    assert after_switch.text == base_expected and after_switch.version == "base"
    assert engine.kv_cache.stats.hits == 0  # v2's keys/values were not reused for the base
    engine.answer([], "Is it dangerous?", history=history, version="v2", conversation="d")
    assert "d" in engine.kv_cache
    engine.remove_adapter("v2")
    assert "d" not in engine.kv_cache and "c" in engine.kv_cache


def test_eviction_falls_back_to_full_encoding(tiny_model_dir, images):
    probe = Engine(load_model(tiny_model_dir), Settings.from_env(max_new_tokens=16))
    probe.answer([images["first"]], "What is this lesion?", conversation="probe")
    one = probe.kv_cache.nbytes
    # Room for a bit more than one conversation: the second evicts the first.
    engine = Engine(load_model(tiny_model_dir), Settings.from_env(max_new_tokens=16))
    engine.kv_cache.budget_bytes = int(one * 1.6)
    a = engine.answer([images["first"]], "What is this lesion?", conversation="a")
    engine.answer([images["second"]], "What is this lesion?", conversation="b")
    assert "a" not in engine.kv_cache and "b" in engine.kv_cache and engine.kv_cache.stats.evictions == 1
    assert engine.kv_cache.nbytes <= engine.kv_cache.budget_bytes
    history = [ChatTurn("What is this lesion?", a.text, [images["first"]])]
    follow = engine.answer([], "Is it dangerous?", history=history, conversation="a")
    assert follow.text == probe.answer([], "Is it dangerous?", history=history).text
    assert engine.kv_cache.stats.hits == 0


def test_a_different_image_under_the_same_key_is_not_reused(tiny_model_dir, images):
    """Image placeholders are the same tokens for every image: reuse must also compare the pixels."""
    engine = Engine(load_model(tiny_model_dir), Settings.from_env(max_new_tokens=16))
    engine.answer([images["first"]], "What is this lesion?", conversation="k")
    other = engine.answer([images["second"]], "What is this lesion?", conversation="k")
    assert other.text == engine.answer([images["second"]], "What is this lesion?").text
    ids = engine._encode([[ChatTurn("What is this lesion?", None, [images["second"]])]])["input_ids"][0]
    first_image_token = int((ids == engine.model.config.image_token_id).nonzero()[0])
    assert engine.kv_cache.stats.reused_tokens == first_image_token  # only what comes before the image


def test_cache_off_and_budget_setting(tiny_model_dir, images):
    engine = Engine(load_model(tiny_model_dir), Settings.from_env(max_new_tokens=8, kv_cache_mb=0))
    engine.answer([images["first"]], "What is this lesion?", conversation="x")
    assert len(engine.kv_cache) == 0
    assert Settings.from_env({"DERMALOOP_KV_CACHE_MB": "64"}).kv_cache_mb == 64
