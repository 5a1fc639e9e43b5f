"""Refine end to end on the tiny model: gold pairs, the gate, registration, model card, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import Settings

QUESTION = "What is this lesion?"
COLOURS = [(200, 40, 40), (40, 180, 60), (40, 60, 200), (220, 200, 40), (40, 200, 200), (200, 40, 200)]
CORRECTIONS = ["Melanoma, refer urgently.", "Psoriasis plaque.", "Benign naevus.", "Impetigo crusts.",
               "Eczema flare.", "Basal cell carcinoma."]


def lesion(colour):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), (225, 190, 160))
    ImageDraw.Draw(img).ellipse((12, 12, 52, 52), fill=colour)
    return img


def seed_store(settings: Settings, items, *, base: str, score: int = 2) -> dict:
    """Record one asked-and-corrected turn per (image, question, model answer, correction)."""
    from annotation_db import store as st
    from annotation_db.db import Store
    from core.images import intake

    db = Store.open(settings.db_url)
    out = {"rating_ids": [], "hashes": []}
    with db.session() as s:
        active = st.ensure_base_version(s, base)
        expert = st.get_or_create_user(s, "dr-expert", "expert")
        clin = st.get_or_create_user(s, "dr-asker", "clinician")
        for img, question, answer, correction in items:
            stored = intake(img, settings.images_dir)
            st.record_image(s, stored.sha256, stored.width, stored.height)
            conv = st.start_conversation(s, clin.id, {"body_site": "back"})
            turn = st.record_turn(s, conv.id, question, answer, image_hashes=[stored.sha256], template="free",
                                  model_version_id=active.id)
            r = st.add_rating(s, turn.id, expert.id, score, correction=correction)
            out["rating_ids"].append(r.id)
            out["hashes"].append(stored.sha256)
    db.dispose()
    return out


def settings_for(home: Path, model_dir: Path) -> Settings:
    return Settings.from_env(home=home, model=str(model_dir), device="cpu", max_new_tokens=24, repetition_penalty=1.0)


FAST = dict(lora_r=16, lora_alpha=32, lora_dropout=0.0, learning_rate=1e-2, batch_size=6, steps=100, save_steps=0,
            warmup_ratio=0.05, gold_holdout=0.0, eval_max_new_tokens=16)


def test_refine_learns_expert_corrections(tiny_model_dir, dermaloop_home):
    from annotation_db import store as st
    from annotation_db.db import Store
    from core.engine import Engine
    from core.models import load_model
    from training.data import Example, write_jsonl
    from training.refine import RefineConfig, run_refine

    settings = settings_for(dermaloop_home, tiny_model_dir)
    images = [lesion(c) for c in COLOURS]
    seeded = seed_store(settings, [(im, QUESTION, "No idea.", c) for im, c in zip(images, CORRECTIONS)], base=str(tiny_model_dir))
    # Synthetic held-out data only (gold_holdout 0: every gold pair is trained on).
    syn_dir = dermaloop_home / "syn"
    syn_dir.mkdir(parents=True)
    lesion((90, 90, 90)).save(syn_dir / "grey.png")
    write_jsonl([Example("g1", [str(syn_dir / "grey.png")], QUESTION, ["Grey patch."], source="synthetic-qa")], syn_dir / "eval.jsonl")
    cfg = RefineConfig(synthetic_eval=[str(syn_dir / "eval.jsonl")], synthetic_ratio=0.0, **FAST)
    outcome = run_refine(settings, cfg, progress=False, force=True)
    assert outcome.status == "promoted", outcome.summary
    assert outcome.version == "v2"

    engine = Engine(load_model(tiny_model_dir), settings)
    db = Store.open(settings.db_url)
    with db.session() as s:
        v2 = st.get_version(s, "v2")
        assert v2.status.value == "active"
        engine.add_adapter("v2", v2.adapter_path)
        assert sorted(r.id for r in st.lineage(s, "v2")) == sorted(seeded["rating_ids"])
    db.dispose()
    for img, correction in zip(images, CORRECTIONS):
        assert engine.answer([img], QUESTION, version="v2", context=None).text != "" 
        got = engine.answer([img], QUESTION, version="v2", context=_ctx()).text
        before = engine.answer([img], QUESTION, version="base", context=_ctx()).text
        assert got == correction
        assert before != correction

    run_dir = outcome.run_dir
    for name in ("report.json", "report.md", "loss.svg", "loss.csv", "config.json", "data.json"):
        assert (run_dir / name).exists(), name
    report = json.loads((run_dir / "report.json").read_text())
    card = (Path(v2.adapter_path) / "README.md").read_text()
    assert "Research use only" in card and str(tiny_model_dir) in card
    assert f"| expert | {len(CORRECTIONS)} |" in card
    loss = report["training"]["final_loss"]
    assert loss < 0.1
    assert (Path(v2.adapter_path) / "refine_config.json").exists()


def _ctx():
    from core.prompts import ClinicalContext

    return ClinicalContext(body_site="back")
