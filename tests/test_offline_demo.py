"""The offline demo model is a demo, never production; a start that cannot serve the active version
stops with one line and changes nothing; refine's --force and --every do what they say."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from annotation_db import store as st
from annotation_db.db import Store
from core.config import Settings
from core.errors import ModelLoadError
from demo.runtime import OFFLINE_BANNER, DemoOptions, start

from conftest import draw_lesion

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "HuggingFaceTB/no-such-model-offline"


def versions_table(url: str) -> list[tuple]:
    db = Store.open(url)
    try:
        with db.session() as s:
            return [(v.name, v.status.value, v.base_model, v.adapter_path, v.status_reason) for v in st.list_versions(s)]
    finally:
        db.dispose()


@pytest.fixture
def expert_store(dermaloop_home, tiny_model_dir, tiny_adapter_dir):
    """A production store whose active version v2 is an adapter experts trained on the tiny base."""
    settings = Settings.from_env(model=str(tiny_model_dir), max_new_tokens=8)
    db = Store.open(settings.db_url)
    with db.session() as s:
        v1 = st.ensure_base_version(s, settings.model)
        v2 = st.register_version(s, base_model=settings.model, adapter_path=str(tiny_adapter_dir), parent_id=v1.id,
                                 note="refined on expert corrections")
        st.promote(s, v2.id, reason="passed the gate")
    db.dispose()
    return settings


def refused(settings: Settings, **kwargs) -> str:
    before = versions_table(settings.db_url)
    with pytest.raises(ModelLoadError) as e:
        start(settings, DemoOptions(poll_s=0), progress=lambda m: None, **kwargs)
    message = str(e.value)
    assert "\n" not in message and "Nothing was changed" in message
    assert versions_table(settings.db_url) == before, "a refused start changed the model versions"
    assert not (settings.home / "offline-demo").exists(), "a store with versions never falls back to the demo"
    return message


def test_hub_unreachable_with_an_expert_trained_active_version_stops_and_changes_nothing(expert_store, tiny_adapter_dir):
    db = Store.open(expert_store.db_url)
    with db.session() as s:  # the active version's base lives on the hub, which cannot be reached
        st.get_version(s, "v2").base_model = UNREACHABLE
    db.dispose()
    message = refused(expert_store, explicit_model=False)
    assert f"version v2 (base {UNREACHABLE}, adapter {tiny_adapter_dir})" in message
    assert "--rollback" in message and f"--model {UNREACHABLE}" in message


def test_a_wrong_model_flag_stops_and_changes_nothing(expert_store):
    message = refused(expert_store.replace(model="HuggingFaceTB/SmolVLM-256M-Instrcut"), explicit_model=True)
    assert "version v2" in message and "could not load model 'HuggingFaceTB/SmolVLM-256M-Instrcut'" in message


def test_another_base_than_the_active_versions_stops_and_changes_nothing(expert_store, tiny_llava_dir):
    message = refused(expert_store.replace(model=str(tiny_llava_dir)), explicit_model=True)
    assert "version v2" in message and f"the app loaded {tiny_llava_dir}" in message


def test_an_adapter_that_does_not_fit_the_base_stops_and_changes_nothing(expert_store, tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from core.models import load_model

    # An adapter with the right module names but other shapes: as if trained on a bigger sibling.
    model = get_peft_model(load_model(tiny_model_dir).model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "misfit")
    weights = load_file(tmp_path / "misfit" / "adapter_model.safetensors")
    save_file({k: torch.zeros(v.shape[0], v.shape[1] + 8) for k, v in weights.items()},
              tmp_path / "misfit" / "adapter_model.safetensors")
    db = Store.open(expert_store.db_url)
    with db.session() as s:
        st.get_version(s, "v2").adapter_path = str(tmp_path / "misfit")
    db.dispose()
    message = refused(expert_store, explicit_model=False)
    assert "version v2" in message and "could not load adapter" in message


def test_an_adapter_flag_that_does_not_fit_registers_nothing(dermaloop_home, tiny_model_dir, tmp_path):
    settings = Settings.from_env(model=str(tiny_model_dir), max_new_tokens=8)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{}")
    versions_table(settings.db_url)  # an empty, migrated store
    with pytest.raises(ModelLoadError, match="could not load adapter"):
        start(settings, DemoOptions(poll_s=0), adapter=tmp_path / "broken", progress=lambda m: None)
    assert versions_table(settings.db_url) == []


def test_the_app_cli_prints_one_line_and_exits_when_the_active_version_cannot_be_served(expert_store):
    out = subprocess.run([sys.executable, "-m", "demo", "--model", UNREACHABLE], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "cannot serve the active model version v2" in errors[0], out.stderr
    assert versions_table(expert_store.db_url)[-1][:2] == ("v2", "active")


# ------------------------------------------------------------------------------ the demo, end to end


def quick_demo(settings: Settings):
    """The demo model built with few steps (the full build is tested in test_demo_model)."""
    from training.demo_model import build_demo_model, demo_refine_config

    return build_demo_model(settings, progress=lambda m: None, cfg=dataclasses.replace(demo_refine_config(), steps=20))


def test_demo_mode_keeps_its_own_store_and_the_documented_loop_works(dermaloop_home, tmp_path):
    from demo.app import build_demo, launch_kwargs
    from demo.auth import AuthConfig
    from training.refine import run as refine

    from test_api import free_port

    settings = Settings.from_env(model=UNREACHABLE, device="cpu", max_new_tokens=8)
    demo_model = quick_demo(settings)
    messages: list[str] = []
    runtime = start(settings, DemoOptions(poll_s=0), explicit_model=False, progress=messages.append)
    assert runtime.offline and OFFLINE_BANNER in runtime.notices and "no model versions" in messages[0]
    assert runtime.settings.home == dermaloop_home / "offline-demo" and runtime.version == demo_model.version
    app = build_demo(runtime.settings, auth=AuthConfig.local(), options=DemoOptions(poll_s=0), runtime=runtime)
    port = free_port()
    app.launch(**launch_kwargs(app, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True))
    try:
        draw_lesion().save(tmp_path / "lesion.png")
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        _, _, turn_id, version = client.predict([handle_file(str(tmp_path / "lesion.png"))], "What is it?", "", "",
                                                api_name="/ask")
        assert version == demo_model.version  # produced by a registered version, and recorded
        client.predict(turn_id, 2, "Most likely a benign naevus.", "benign naevus", "", api_name="/rate")
    finally:
        app.close()
        runtime.store.dispose()

    # Nothing reached the production store.
    assert versions_table(settings.db_url) == []
    prod = Store.open(settings.db_url)
    with prod.session() as s:
        assert st.gold_pairs(s).pairs == []
    prod.dispose()

    # The documented command, with the same data directory, trains the demo's model on the demo's rating.
    rc = refine.main(["--home", str(dermaloop_home), "--steps", "2", "--gold-holdout", "0", "--quiet",
                      "--device", "cpu", "--eval-max-new-tokens", "8"])
    assert rc == 0
    demo_versions = versions_table(demo_model.settings.db_url)
    assert [v[0] for v in demo_versions] == ["v1", "v2"] and demo_versions[1][1] in ("active", "rejected")
    assert demo_versions[1][2] == str(demo_model.base_dir)
    demo_db = Store.open(demo_model.settings.db_url)
    with demo_db.session() as s:
        assert len(st.lineage(s, "v2", ancestors=False)) == 1  # the expert's rating went in
    demo_db.dispose()
    assert versions_table(settings.db_url) == []


def test_a_version_refined_in_the_demo_stays_active_across_restarts(dermaloop_home):
    settings = Settings.from_env(model=UNREACHABLE, device="cpu", max_new_tokens=8)
    demo_model = quick_demo(settings)
    first = start(settings, DemoOptions(poll_s=0), progress=lambda m: None)
    with first.store.session() as s:
        later = st.register_version(s, base_model=str(demo_model.base_dir), adapter_path=str(demo_model.adapter_dir),
                                    parent_id=st.active_version(s).id, status="active", note="refined later").name
    first.store.dispose()
    again = start(settings, DemoOptions(poll_s=0), progress=lambda m: None)
    assert again.offline and again.version == later
    again.store.dispose()
    assert [v[0] for v in versions_table(demo_model.settings.db_url)] == ["v1", later]


def test_without_the_fallback_an_empty_store_and_an_unreachable_model_is_an_error(dermaloop_home):
    settings = Settings.from_env(model=UNREACHABLE)
    with pytest.raises(ModelLoadError, match="could not load model"):
        start(settings, DemoOptions(offline_fallback=False), progress=lambda m: None)
    assert versions_table(settings.db_url) == [] and not (dermaloop_home / "offline-demo").exists()


def test_demo_mode_is_entered_only_on_an_empty_store_or_when_asked(dermaloop_home, tiny_model_dir):
    from training.demo_model import in_demo_mode

    settings = Settings.from_env(model=str(tiny_model_dir))
    assert not in_demo_mode(settings)  # no demo yet
    (dermaloop_home / "offline-demo").mkdir(parents=True)
    Store.open(Settings.from_env(home=dermaloop_home / "offline-demo").db_url).dispose()
    assert in_demo_mode(settings)  # a demo and an empty production store
    assert in_demo_mode(settings.replace(offline_demo=True))
    db = Store.open(settings.db_url)
    with db.session() as s:
        st.ensure_base_version(s, settings.model)
    db.dispose()
    assert not in_demo_mode(settings)  # production has a version: never the demo again unless asked


# ------------------------------------------------------------------------------ refine --force, --every


def test_refine_force_without_held_out_examples_promotes_ungated(dermaloop_home, tiny_model_dir, tmp_path):
    from training.data.phantoms import write_phantoms
    from training.refine import run as refine

    write_phantoms(tmp_path / "ph", 8, seed=0, split="train", size=64)
    base = ["--home", str(dermaloop_home), "--model", str(tiny_model_dir), "--synthetic", str(tmp_path / "ph" / "train.jsonl"),
            "--synthetic-holdout", "0", "--min-new", "0", "--steps", "2", "--quiet", "--device", "cpu"]
    settings = Settings.from_env(model=str(tiny_model_dir))
    assert refine.main(base) == 0  # a young store: trained, evaluated where it can, registered as rejected, said why
    table = versions_table(settings.db_url)
    assert table[-1][1] == "rejected" and "no held-out cases to evaluate on" in table[-1][4] and "--force" in table[-1][4]
    assert refine.main([*base, "--force"]) == 0
    table = versions_table(settings.db_url)
    assert table[-1][1] == "active" and "without the gate" in table[-1][4]
    reports = [p.read_text() for p in sorted(settings.runs_dir.glob("*/report.json"))]
    assert '"forced": false' in reports[0] and '"forced": true' in reports[1]


def test_refine_every_logs_failures_backs_off_and_keeps_going(monkeypatch, dermaloop_home, capsys):
    from training.errors import TrainingError
    from training.refine import run as refine

    calls, sleeps = [], []

    def flaky(settings, cfg, **kwargs):
        calls.append(1)
        if len(calls) <= 3:
            raise TrainingError(f"store away (try {len(calls)})")
        return refine.Outcome(refine.Status.skipped, "refine: nothing to do")

    def sleep(s):
        sleeps.append(s)
        if len(sleeps) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(refine, "run_refine", flaky)
    monkeypatch.setattr(refine.time, "sleep", sleep)
    assert refine.main(["--every", "1h"]) == 130
    assert sleeps == [60.0, 120.0, 240.0, 3600.0, 3600.0]  # backs off, then back to the interval after a success
    err = capsys.readouterr().err
    assert "store away (try 1)" in err and "store away (try 3)" in err


def test_refine_every_exits_on_a_configuration_error(dermaloop_home, capsys):
    from training.refine import run as refine

    assert refine.main(["--every", "6x"]) == 1
    assert refine.main(["--every", "1h", "--gold-holdout", "2"]) == 1
    assert "--gold-holdout must be at least 0 and below 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------ DERMALOOP_LONGEST_EDGE


def test_longest_edge_changes_what_the_model_sees(tiny_model_dir, caplog):
    from PIL import Image

    from core.models import load_model

    image = Image.new("RGB", (400, 300), (200, 100, 50))

    def pixels(**kw):
        loaded = load_model(tiny_model_dir, image_splitting="on", **kw)
        return loaded.processor.image_processor(images=[[image]], return_tensors="pt")["pixel_values"].shape

    default, small = pixels(), pixels(longest_edge=64)
    assert default != small and small[1] < default[1]  # fewer tiles at a shorter edge


def test_longest_edge_on_a_fixed_size_processor_says_it_has_no_effect(tiny_llava_dir, caplog):
    from core.models import load_model

    with caplog.at_level("WARNING", logger="dermaloop.core"):
        load_model(tiny_llava_dir, longest_edge=128)
    assert "no effect" in caplog.text


def test_the_readmes_first_refine_example_trains_on_a_fresh_store(dermaloop_home, tiny_model_dir, tmp_path):
    """README "Refinement": the synthetic-only command does something on a store with no ratings."""
    import re
    import shlex

    from training.data.phantoms import write_phantoms
    from training.refine import run as refine

    block = re.search(r"## Refinement.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    line = next(ln for ln in block.splitlines() if ln.startswith("python -m training.refine"))
    args = shlex.split(line.split("#", 1)[0])[3:]
    write_phantoms(tmp_path / "phantoms", 40, seed=0, split="train", size=64)
    args = [a.replace("phantoms/", f"{tmp_path / 'phantoms'}/") for a in args]
    assert refine.main([*args, "--model", str(tiny_model_dir), "--steps", "2", "--quiet", "--device", "cpu",
                        "--eval-max-new-tokens", "4"]) == 0
    assert [v[0] for v in versions_table(Settings.from_env().db_url)] == ["v1"]
