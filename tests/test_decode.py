"""CPU decode modes (core/decode.py): re-laid weights and the compiled decode step give the same answers.

    python -m pytest -q -p no:cacheprovider tests/test_decode.py

Speed is measured by `python -m bench.engine` (c), never here.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch._dynamo.utils import counters

from core.config import GenerationSettings, Settings
from core.decode import _decode_linears, set_layout, tune_for_cpu
from core.engine import Engine
from core.models import load_model
from core.prompts import ChatTurn

from conftest import draw_lesion

GEN = GenerationSettings(max_new_tokens=10, repetition_penalty=1.0)


def _answers(engine: Engine, batch: bool = True) -> list[str]:
    """Alone, a follow-up from the conversation cache, and batched (two rows): every decode path."""
    img, other = draw_lesion(), draw_lesion((70, 90), colour=(60, 30, 30))
    first = engine.answer([img], "What is this lesion?", generation=GEN, conversation="c")
    follow = engine.answer([], "Is it dangerous?", history=[ChatTurn("What is this lesion?", first.text, [img])], generation=GEN,
                           conversation="c")
    rows = [ChatTurn("Describe it.", None, [img]), ChatTurn("Is this one benign?", None, [other])]
    return [first.text, follow.text, *(a.text for a in (engine.answer_batch(rows, generation=GEN) if batch else []))]


def _layouts(model) -> dict[str, bool]:
    """Each linear weight's name -> whether it is stored input-major."""
    return {name: not m.weight.is_contiguous() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_input_major_keeps_the_values_and_moves_only_what_a_decode_step_reads(tiny_model_dir):
    model = load_model(tiny_model_dir).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    decode = {id(m) for m in _decode_linears(model)}
    moved = set_layout(model, True)
    assert moved == len(decode) > 0
    assert set_layout(model, True) == 0  # idempotent
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            w = m.weight
            assert (w.t().is_contiguous() and not w.is_contiguous()) == (id(m) in decode), name
            assert "vision" not in name or w.is_contiguous()  # the vision tower runs once per image: left as loaded
    assert model.lm_head.weight.t().is_contiguous()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert set_layout(model, False) == moved
    assert not any(_layouts(model).values())


def test_a_head_tied_to_the_input_embeddings_is_left_as_loaded(tiny_model_dir):
    model = load_model(tiny_model_dir).model
    model.lm_head.weight = model.get_input_embeddings().weight  # as Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision do
    set_layout(model, True)
    assert model.lm_head.weight.is_contiguous() and model.get_input_embeddings().weight.is_contiguous()
    assert not model.model.text_model.layers[0].mlp.down_proj.weight.is_contiguous()


def test_the_engine_tunes_the_model_at_its_first_answer_not_before(tiny_model_dir):
    """refine builds an Engine for prompt text and trains the same model: nothing may move until an answer
    (or an adapter added for answering)."""
    loaded = load_model(tiny_model_dir)
    engine = Engine(loaded, Settings.from_env(max_new_tokens=4, cpu_decode="input-major"))
    assert not any(_layouts(loaded.model).values())
    engine.answer([draw_lesion()], "What is this?")
    assert any(_layouts(loaded.model).values())


def test_input_major_answers_equal_the_answers_as_loaded(tiny_model_dir, tiny_llava_dir):
    for path in (tiny_model_dir, tiny_llava_dir):
        loaded = load_model(path)
        as_loaded = _answers(Engine(loaded, Settings.from_env(cpu_decode="as-loaded")))
        assert not any(_layouts(loaded.model).values())
        assert _answers(Engine(loaded, Settings.from_env(cpu_decode="input-major"))) == as_loaded


def _adapter(model_dir, out, *, lora: bool):
    """A LoRA adapter with its own copy of the output head (modules_to_save, as refine's adapters have: peft copies
    the head when it loads one, so a compiled head must not travel into the copy); `lora`: non-zero LoRA in attention
    too (else only the head changes the answers)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(load_model(model_dir).model,
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name or (lora and "lora_B" in name):
                p.add_(torch.randn_like(p))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    return {"v2": _adapter(tiny_model_dir, tmp_path_factory.mktemp("head-adapter"), lora=False),
            "v3": _adapter(tiny_model_dir, tmp_path_factory.mktemp("lora-adapter"), lora=True)}


def test_compiled_decode_gives_the_same_answers_for_the_base_and_adapters(tiny_model_dir, adapter_dirs, caplog):
    """Two adapters, switched back and forth, each compiled again after the other was added."""
    eager = Engine(load_model(tiny_model_dir), Settings.from_env(cpu_decode="as-loaded"))
    base = _answers(eager)
    expected = {"base": base[:2]}
    for name, path in adapter_dirs.items():
        eager.add_adapter(name, path)
        eager.use(name)
        expected[name] = _answers(eager, batch=False)  # alone: each batch shape is another compile (~15 s here)
    assert len({tuple(v) for v in expected.values()}) == 3  # each version answers differently: the comparisons can fail

    counters.clear()
    compiled_loaded = load_model(tiny_model_dir)
    compiled = Engine(compiled_loaded, Settings.from_env(cpu_decode="compiled"))
    with caplog.at_level("WARNING", logger="dermaloop.core"):
        assert _answers(compiled) == base
        assert counters["stats"]["unique_graphs"] > 0  # the decode steps did go through torch.compile
        for name, path in adapter_dirs.items():  # peft adds layers: the step compiles again with them
            compiled.add_adapter(name, path)
        for name in ("v2", "v3", "base", "v3"):
            compiled.use(name)
            assert _answers(compiled, batch=False) == expected[name], name
        compiled.remove_adapter("v2")  # its layers leave every version's path: compiled again, same answers
        assert _answers(compiled, batch=False) == expected["v3"]
    assert not [r for r in caplog.records if "compiling failed" in r.getMessage()]  # compiled, not eager after a failure
    tune_for_cpu(compiled_loaded.model, "input-major")  # back to eager
    assert "forward" not in compiled_loaded.model.get_decoder().__dict__


def test_an_unknown_mode_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="cpu_decode must be one of"):
        tune_for_cpu(load_model(tiny_model_dir).model, "fast")


def test_a_failed_compile_answers_eagerly_with_one_warning(tiny_model_dir, monkeypatch, caplog):
    def no_compiler(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")
        return run

    monkeypatch.setattr("core.decode.torch.compile", no_compiler)
    expected = _answers(Engine(load_model(tiny_model_dir), Settings.from_env(cpu_decode="as-loaded")))
    with caplog.at_level("WARNING", logger="dermaloop.core"):
        assert _answers(Engine(load_model(tiny_model_dir), Settings.from_env(cpu_decode="compiled"))) == expected
    warnings = [r.getMessage() for r in caplog.records if "compiling failed" in r.getMessage()]
    assert warnings and "No working C++ compiler found" in warnings[0] and "more" not in warnings[0]
    assert len(warnings) == 2  # once per compiled module (decoder, head), not once per token


def test_warm_up_compiles_before_any_answer(tiny_model_dir, caplog):
    counters.clear()
    engine = Engine(load_model(tiny_model_dir), Settings.from_env(cpu_decode="compiled"))
    with caplog.at_level("WARNING", logger="dermaloop.core"):
        engine.warm_up()
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0
        _answers(engine)  # alone and batched: the shapes warm_up compiled
        assert counters["stats"]["unique_graphs"] == graphs
    assert not [r for r in caplog.records if "compiling failed" in r.getMessage()]
    counters.clear()
    Engine(load_model(tiny_model_dir), Settings.from_env(cpu_decode="input-major")).warm_up()
    assert counters["stats"]["unique_graphs"] == 0


def test_the_app_compiles_at_start_and_after_a_promotion(tiny_model_dir, tiny_adapter_dir, store, monkeypatch):
    """`warm_up` itself is tested above; here: the app calls it for the version it serves, then for a promoted one."""
    from annotation_db import store as st
    from demo.runtime import attach

    calls: list[str] = []
    monkeypatch.setattr(Engine, "warm_up", lambda self: calls.append(self.default_version))
    settings = Settings.from_env(model=str(tiny_model_dir), cpu_decode="compiled")
    runtime = attach(settings, Engine(load_model(tiny_model_dir), settings), store)

    def called(version: str) -> bool:
        deadline = time.monotonic() + 10
        while version not in calls and time.monotonic() < deadline:
            time.sleep(0.05)
        return version in calls

    assert called("v1")
    with store.session() as s:
        v2 = st.register_version(s, base_model=settings.model, adapter_path=str(tiny_adapter_dir), parent_id=st.active_version(s).id)
        st.promote(s, v2.id, reason="better on the held-out set")
    assert runtime.sync(force=True) == "v2" and called("v2")
