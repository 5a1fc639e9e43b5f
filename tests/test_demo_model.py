"""The offline demo model: built, trained on phantoms to high held-out accuracy, registered, then cached."""

from __future__ import annotations

import time

import pytest

from core.config import Settings


@pytest.mark.slow
def test_demo_model_builds_learns_phantoms_and_is_cached(dermaloop_home):
    from annotation_db import store as st
    from annotation_db.db import Store
    from core.engine import Engine
    from core.models import load_model
    from training.data.phantoms import CLASSES, generate
    from training.demo_model import ensure_demo_model

    settings = Settings.from_env(home=dermaloop_home, device="cpu")
    messages: list[str] = []
    start = time.perf_counter()
    demo = ensure_demo_model(settings, progress=messages.append)
    built_s = time.perf_counter() - start
    assert demo.version == "v1" and (demo.base_dir / "config.json").exists()
    assert (demo.adapter_dir / "adapter_config.json").exists()
    assert "accuracy" in messages[-1]
    assert demo.settings.home == dermaloop_home / "offline-demo" and demo.base_dir.is_relative_to(dermaloop_home.resolve())
    db = Store.open(demo.settings.db_url)
    with db.session() as s:
        v1 = st.get_version(s, "v1")
        assert v1.status.value == "active" and v1.base_model == str(demo.base_dir)
        assert [v.name for v in st.list_versions(s)] == ["v1"]
        metrics = v1.metrics
    db.dispose()
    acc, before = metrics["candidate"]["diagnosis_accuracy"], metrics["active"]["diagnosis_accuracy"]
    print(f"demo model: held-out phantom diagnosis accuracy {before:.2f} -> {acc:.2f}, built in {built_s:.0f} s")
    assert before <= 0.35 and acc >= 0.9
    card = (demo.adapter_dir / "README.md").read_text()
    assert "Offline demonstration model" in card and f"{acc:.4f}" in card

    # The model uses the image: the same question about phantoms of different classes gets each class's answer.
    engine = Engine(load_model(demo.base_dir, device="cpu"), settings.replace(max_new_tokens=8, repetition_penalty=1.0))
    engine.add_adapter("v1", demo.adapter_dir)
    held = generate(24, seed=0, split="heldout", size=64)
    answers = [engine.answer([p.image], "What is the most likely diagnosis?", version="v1").text for p in held]
    right = sum(a.lower().startswith(f"most likely {p.label}") for a, p in zip(answers, held))
    assert right >= 20, list(zip([p.label for p in held], answers))
    assert len({a.split(".")[0] for a in answers}) == len(CLASSES)

    # Second start: instant, nothing rebuilt.
    start = time.perf_counter()
    again = ensure_demo_model(settings, progress=messages.append)
    assert again == demo and time.perf_counter() - start < 2.0
