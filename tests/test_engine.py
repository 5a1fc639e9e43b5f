"""Model loading and the engine: streaming, stop, multi-turn, multi-image, adapters, both tiny families."""

import threading

import pytest
import torch

from core.config import GenerationSettings, Settings
from core.engine import Engine
from core.errors import InputError, ModelLoadError
from core.models import load_model
from core.prompts import ChatTurn, ClinicalContext

from conftest import draw_lesion


def _make_adapter(model_dir, out_dir, seed, modules_to_save=None):
    """A random (non-zero) LoRA adapter in peft format, as refine would save it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = load_model(model_dir).model
    targets = ["q_proj", "v_proj"] if modules_to_save else ["q_proj", "v_proj", "lm_head"]
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                                 init_lora_weights=False, modules_to_save=modules_to_save))
    if modules_to_save:  # a fully trained copy of the module, as training would leave it
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "modules_to_save" in name:
                    param.add_(torch.randn_like(param) * 0.5)
    peft_model.save_pretrained(out_dir)
    return out_dir


def test_missing_local_path_is_a_domain_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model directory not found: .*nowhere"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        load_model(tmp_path / "empty")


def test_unreachable_hub_id_is_a_domain_error():
    with pytest.raises(ModelLoadError, match="HuggingFaceTB/SmolVLM-256M-Instruct"):
        load_model("HuggingFaceTB/SmolVLM-256M-Instruct")


def test_loader_records_what_it_loaded(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    assert loaded.info.model_type == "idefics3" and loaded.info.device == "cpu" and loaded.info.dtype == "float32"
    assert loaded.info.image_splitting is False  # auto on CPU: no tiling
    assert loaded.info.parameters == sum(p.numel() for p in loaded.model.parameters())
    assert load_model(tiny_model_dir, image_splitting="on").info.image_splitting is True


def test_stream_equals_answer_and_is_deterministic(tiny_engine):
    img = draw_lesion()
    ctx = ClinicalContext(age=61, body_site="scalp")
    whole = tiny_engine.answer([img], "What is this lesion?", context=ctx)
    gen = tiny_engine.stream([img], "What is this lesion?", context=ctx)
    chunks = list(gen)
    assert len(chunks) > 1 and "".join(chunks).strip() == whole.text == gen.result.text
    assert whole.text == tiny_engine.answer([img], "What is this lesion?", context=ctx).text
    assert whole.status == "complete" and whole.version == "base" and whole.completion_tokens > 0
    assert whole.ttft_s is not None and 0 < whole.ttft_s <= whole.latency_s
    assert whole.generation["do_sample"] is False


def test_stop_returns_partial_answer(tiny_engine):
    gen = tiny_engine.stream([draw_lesion()], "Describe it.", generation=GenerationSettings(max_new_tokens=400, repetition_penalty=1.0))
    it = iter(gen)
    first = next(it)
    gen.stop()
    rest = "".join(it)
    assert gen.result.status == "stopped"
    assert 0 < gen.result.completion_tokens < 400
    assert gen.result.text.startswith(first.strip()[:3]) and (first + rest).strip() == gen.result.text


def test_multi_turn_and_multi_image_carry_every_image_and_turn(tiny_engine):
    a, b, c = draw_lesion(colour=(200, 0, 0)), draw_lesion(colour=(0, 200, 0)), draw_lesion(colour=(0, 0, 200))
    history = [ChatTurn("Two views of the lesion.", "A red papule.", [a, b], ClinicalContext(age=40))]
    text, images = tiny_engine.encode_prompt([*history, ChatTurn("And this one?", None, [c])])
    assert images == [a, b, c]
    assert text.count("<image>") == 3
    assert "Two views of the lesion." in text and "A red papule." in text and "And this one?" in text
    assert text.index("A red papule.") < text.index("And this one?")
    inputs = tiny_engine._encode([[*history, ChatTurn("And this one?", None, [c])]])
    assert inputs["pixel_values"].shape[1] == 3  # three images reach the vision tower
    assert int((inputs["input_ids"] == tiny_engine.model.config.image_token_id).sum()) == 3 * tiny_engine.processor.image_seq_len
    answer = tiny_engine.answer([c], "And this one?", history=history)
    assert answer.prompt_tokens > tiny_engine.answer([c], "And this one?").prompt_tokens


def test_too_many_images_and_bad_questions_rejected(tiny_engine):
    img = draw_lesion()
    with pytest.raises(InputError, match="at most 4"):
        tiny_engine.answer([img] * 5, "Too many?")
    with pytest.raises(InputError, match="empty"):
        tiny_engine.answer([img], "   ")
    with pytest.raises(InputError, match="100,000 characters"):
        tiny_engine.answer([img], "x" * 100_000)
    with pytest.raises(InputError, match="not loaded"):
        tiny_engine.answer([img], "Which version?", version="v9")


def test_adapter_switch_changes_output_and_back_restores_exactly(tiny_engine, tiny_model_dir, tmp_path):
    img = draw_lesion()
    base = tiny_engine.answer([img], "What is it?").text
    tiny_engine.add_adapter("v2", _make_adapter(tiny_model_dir, tmp_path / "a2", seed=1))
    tiny_engine.add_adapter("v3", _make_adapter(tiny_model_dir, tmp_path / "a3", seed=2))
    assert tiny_engine.answer([img], "What is it?").text == base  # loading does not change the default
    v2 = tiny_engine.answer([img], "What is it?", version="v2")
    v3 = tiny_engine.answer([img], "What is it?", version="v3")
    assert v2.version == "v2" and v2.text != base and v3.text not in (base, v2.text)
    tiny_engine.use("v2")
    assert tiny_engine.answer([img], "What is it?").text == v2.text
    tiny_engine.use("base")
    assert tiny_engine.answer([img], "What is it?").text == base
    tiny_engine.add_base_version("v1")
    assert tiny_engine.answer([img], "What is it?", version="v1").text == base
    tiny_engine.remove_adapter("v3")
    assert "v3" not in tiny_engine.versions
    assert tiny_engine.answer([img], "What is it?", version="v2").text == v2.text
    with pytest.raises(ModelLoadError, match="adapter not found"):
        tiny_engine.add_adapter("v4", tmp_path / "missing")


def test_concurrent_callers_are_serialised(tiny_engine):
    imgs = [draw_lesion(colour=(40 * i, 80, 120)) for i in range(4)]
    expected = [tiny_engine.answer([im], f"Question {i}?").text for i, im in enumerate(imgs)]
    results: dict[int, str] = {}

    def ask(i):
        results[i] = "".join(tiny_engine.stream([imgs[i]], f"Question {i}?"))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i].strip() for i in range(4)] == expected


def test_batch_matches_single_answers(tiny_engine):
    from core.prompts import ChatTurn

    reqs = [ChatTurn(q, images=[draw_lesion(colour=(30 * i, 90, 60))])
            for i, q in enumerate(["Short?", "A somewhat longer question about the lesion?", "Size?"])]
    batch = tiny_engine.answer_batch(reqs, batch_size=2)
    assert [a.text for a in batch] == [tiny_engine.answer(r.images, r.question).text for r in reqs]


def test_llava_family_loads_and_answers(tiny_llava_dir):
    engine = Engine(load_model(tiny_llava_dir), Settings.from_env(max_new_tokens=8))
    assert engine.info.model_type == "llava"
    answer = engine.answer([draw_lesion(), draw_lesion(colour=(10, 10, 10))], "Compare the two images.")
    assert answer.status == "complete" and answer.completion_tokens > 0
    assert "".join(engine.stream([draw_lesion()], "Again?")).strip() == engine.answer([draw_lesion()], "Again?").text


def test_tiny_models_are_deterministic_per_seed(tmp_path):
    from core.tiny import build_tiny_model

    a = load_model(build_tiny_model(tmp_path / "a", seed=3)).model.state_dict()
    b = load_model(build_tiny_model(tmp_path / "b", seed=3)).model.state_dict()
    c = load_model(build_tiny_model(tmp_path / "c", seed=4)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_modules_to_save_adapter_survives_a_switch_through_the_base(tiny_model_dir, tmp_path):
    """An adapter with a fully trained lm_head answers as the same adapter merged into a fresh base."""
    from peft import PeftModel

    from core.models import LoadedModel

    img = draw_lesion()
    adapter = _make_adapter(tiny_model_dir, tmp_path / "mts", seed=5, modules_to_save=["lm_head"])
    engine = Engine(load_model(tiny_model_dir), Settings.from_env(max_new_tokens=12))
    engine.add_adapter("v2", adapter)  # loading switches back to the base: adapters disabled once
    base = engine.answer([img], "What is it?").text
    got = engine.answer([img], "What is it?", version="v2").text
    fresh = load_model(tiny_model_dir)
    merged = PeftModel.from_pretrained(fresh.model, adapter).merge_and_unload()
    reference = Engine(LoadedModel(merged, fresh.processor, fresh.info), Settings.from_env(max_new_tokens=12))
    assert got == reference.answer([img], "What is it?").text != base
