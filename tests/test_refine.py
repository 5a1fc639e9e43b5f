"""Refine end to end on the tiny model: gold pairs, the gate, registration, rollback, model card, reports."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from core.config import Settings

QUESTION = "What is this lesion?"
COLOURS = [(200, 40, 40), (40, 180, 60), (40, 60, 200), (220, 200, 40), (40, 200, 200), (200, 40, 200)]
CORRECTIONS = ["Melanoma, refer urgently.", "Psoriasis plaque.", "Benign naevus.", "Impetigo crusts.",
               "Eczema flare.", "Basal cell carcinoma."]
CONTEXT = {"body_site": "back"}
FAST = dict(lora_r=16, lora_alpha=32, lora_dropout=0.0, learning_rate=1e-2, batch_size=6, steps=150, save_steps=0,
            warmup_ratio=0.05, gold_holdout=0.0, eval_max_new_tokens=12, eval_metrics="rouge,repetition",
            gate_min_n=5)  # six held-out lesions: the tests decide on fewer cases than a real gate would


def lesion(colour, size=64):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (225, 190, 160))
    ImageDraw.Draw(img).ellipse((size // 5, size // 5, 4 * size // 5, 4 * size // 5), fill=colour)
    return img


def seed_store(settings: Settings, items, *, base: str, rater: str = "dr-expert", role: str = "expert",
               score: int = 2) -> dict:
    """Record one asked-and-corrected turn per (image, question, model answer, correction)."""
    from annotation_db import store as st
    from annotation_db.db import Store
    from core.images import intake

    db = Store.open(settings.db_url)
    out: dict = {"rating_ids": [], "hashes": []}
    with db.session() as s:
        active = st.ensure_base_version(s, base)
        expert = st.get_or_create_user(s, rater, role)
        clin = st.get_or_create_user(s, "dr-asker", "clinician")
        for img, question, answer, correction in items:
            stored = intake(img, settings.images_dir)
            st.record_image(s, stored.sha256, stored.width, stored.height)
            conv = st.start_conversation(s, clin.id, CONTEXT)
            turn = st.record_turn(s, conv.id, question, answer, image_hashes=[stored.sha256], template="free",
                                  model_version_id=active.id)
            out["rating_ids"].append(st.add_rating(s, turn.id, expert.id, score, correction=correction).id)
            out["hashes"].append(stored.sha256)
    db.dispose()
    return out


def settings_for(home: Path, model_dir: Path) -> Settings:
    return Settings.from_env(home=home, model=str(model_dir), device="cpu", max_new_tokens=24, repetition_penalty=1.0)


def eval_file(folder: Path, answers=CORRECTIONS) -> Path:
    """A synthetic evaluation set: the same lesions and question with the expert answers as references."""
    from training.data.examples import Example, write_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for i, (c, a) in enumerate(zip(COLOURS, answers)):
        lesion(c).save(folder / f"l{i}.png")
        examples.append(Example(f"e{i}", [str(folder / f"l{i}.png")], QUESTION, [a], context=CONTEXT, source="synthetic-qa"))
    write_jsonl(examples, folder / "eval.jsonl")
    return folder / "eval.jsonl"


def versions(settings: Settings) -> dict[str, str]:
    from annotation_db import store as st
    from annotation_db.db import Store

    db = Store.open(settings.db_url)
    with db.session() as s:
        out = {v.name: v.status.value for v in st.list_versions(s)}
    db.dispose()
    return out


@pytest.mark.slow
def test_corrections_learned_gate_rejects_bad_candidate_rollback(tiny_model_dir, dermaloop_home, capsys):
    from annotation_db import store as st
    from annotation_db.db import Store
    from core.engine import Engine
    from core.models import load_model
    from core.prompts import ClinicalContext
    from training.refine.run import RefineConfig, main, run_refine

    settings = settings_for(dermaloop_home, tiny_model_dir)
    images = [lesion(c) for c in COLOURS]
    seeded = seed_store(settings, [(im, QUESTION, "No idea.", c) for im, c in zip(images, CORRECTIONS)], base=str(tiny_model_dir))
    evals = eval_file(dermaloop_home / "syn")
    cfg = RefineConfig(synthetic_eval=[str(evals)], synthetic_ratio=0.0, **FAST)
    outcome = run_refine(settings, cfg, progress=False)
    assert outcome.status == "promoted", outcome.summary
    assert outcome.version == "v2"

    # The new active version says what the experts said; the previous one did not.
    engine = Engine(load_model(tiny_model_dir), settings)
    db = Store.open(settings.db_url)
    with db.session() as s:
        v2 = st.get_version(s, "v2")
        assert v2.status.value == "active"
        engine.add_adapter("v2", v2.adapter_path)
        assert sorted(r.id for r in st.lineage(s, "v2")) == sorted(seeded["rating_ids"])
    ctx = ClinicalContext.from_dict(CONTEXT)
    for img, correction in zip(images, CORRECTIONS):
        assert engine.answer([img], QUESTION, context=ctx, version="v2").text == correction
        assert engine.answer([img], QUESTION, context=ctx, version="base").text != correction

    # Model card and reports name the real numbers.
    run_dir, report = outcome.run_dir, outcome.report
    for name in ("report.json", "report.md", "loss.svg", "loss.csv", "config.json", "data.json"):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "report.json").read_text())["decision"]["promote"] is True
    adapter = Path(v2.adapter_path)
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "Research use only" in card and str(tiny_model_dir) in card
    assert f"| expert | {len(CORRECTIONS)} |" in card
    rouge_after, rouge_before = report["metrics_candidate"]["rougeL"], report["metrics_active"]["rougeL"]
    assert rouge_after > rouge_before
    assert f"| rougeL | {rouge_before:.4f} | {rouge_after:.4f} |" in card
    assert f"{report['training']['final_loss']:.4f}" in (run_dir / "report.md").read_text()
    assert report["training"]["final_loss"] < 0.2
    assert json.loads((adapter / "refine_config.json").read_text())["refine"]["learning_rate"] == FAST["learning_rate"]
    assert (adapter / "eval" / "report.json").exists()

    # A candidate trained on wrong answers (a clinician's bad corrections) is rejected; v2 stays active.
    wrong = CORRECTIONS[1:] + CORRECTIONS[:1]
    seed_store(settings, [(im, QUESTION, "Unsure.", w) for im, w in zip(images, wrong)], base=str(tiny_model_dir),
               rater="dr-wrong", role="clinician")
    bad = RefineConfig(synthetic_eval=[str(evals)], synthetic_ratio=0.0, roles=["clinician"], from_base=True, **FAST)
    outcome = run_refine(settings, bad, progress=False)
    assert outcome.status == "rejected", outcome.summary
    assert "rejected by the gate: rougeL: candidate" in outcome.summary and "worse by more than 0.05" in outcome.summary
    assert versions(settings) == {"v1": "retired", "v2": "active", "v3": "rejected"}
    with db.session() as s:
        assert "rejected by the gate" in st.get_version(s, "v3").status_reason
    db.dispose()

    # --rollback and --list
    assert main(["--rollback", "v1"]) == 0
    assert versions(settings)["v1"] == "active" and versions(settings)["v2"] == "retired"
    assert main(["--rollback", "v2"]) == 0  # a rollback is itself reversible
    assert versions(settings)["v2"] == "active"
    assert main(["--rollback", "v3"]) == 1  # the gate rejected v3: only with --force
    assert "v3 was rejected" in capsys.readouterr().err
    assert versions(settings)["v3"] == "rejected"
    capsys.readouterr()
    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert "v2" in listing and "active" in listing and "rougeL=" in listing


def test_min_new_noop_dry_run_and_lock(tiny_model_dir, dermaloop_home, capsys):
    import socket

    from annotation_db import store as st
    from annotation_db.db import Store
    from training.refine.run import EXIT_BUSY, main

    settings = settings_for(dermaloop_home, tiny_model_dir)
    seed_store(settings, [(lesion(c), QUESTION, "No idea.", a) for c, a in zip(COLOURS[:2], CORRECTIONS)], base=str(tiny_model_dir))
    assert main(["--min-new", "3", "--quiet"]) == 0
    assert "nothing to do: 2 new gold pair(s)" in capsys.readouterr().out
    assert versions(settings) == {"v1": "active"}
    assert main(["--dry-run", "--gold-holdout", "0"]) == 0
    out = capsys.readouterr().out
    assert "gold_train: 2" in out and "gold_pairs: 2" in out
    # A live process holds the lock: refine says so and exits 75 without training.
    db = Store.open(settings.db_url)
    with db.session() as s:
        st.acquire_lock(s, "refine", "someone-else", os.getpid(), socket.gethostname())
    assert main(["--min-new", "0", "--quiet", "--gold-holdout", "0"]) == EXIT_BUSY
    assert "another refine is running" in capsys.readouterr().out
    with db.session() as s:
        assert st.release_lock(s, "refine", "someone-else")
    db.dispose()
    assert not list((dermaloop_home / "runs").glob("*")) if (dermaloop_home / "runs").exists() else True


def test_config_flags_file_and_errors(tmp_path, capsys):
    from core.config import Settings, parse_cli
    from training.refine.config import RefineActions, RefineConfig
    from training.refine.run import main

    cfg_file = tmp_path / "refine.yaml"
    cfg_file.write_text("learning_rate: 0.001\nsynthetic: [a.jsonl]\nlora-vision: true\n")
    (cfg, act, _), given = parse_cli([RefineConfig, RefineActions, Settings], [
        "--config", str(cfg_file), "--synthetic", "b.jsonl", "--synthetic", "c.jsonl", "--no-lora-vision",
        "--supervision", "qa+caption", "--list", "--resume"], prog="refine")
    assert cfg.learning_rate == 0.001 and cfg.synthetic == ["b.jsonl", "c.jsonl"] and cfg.lora_vision is False
    assert cfg.supervision == "qa+caption" and cfg.roles == ["expert", "admin"]
    assert act.list_versions and act.resume == "latest" and not act.dry_run
    assert {"learning_rate", "synthetic", "lora_vision", "supervision"} <= given and "roles" not in given
    assert RefineConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SystemExit) as e:
        main(["--supervision", "pictures"])
    assert e.value.code == 2 and "invalid choice: 'pictures'" in capsys.readouterr().err
    assert main(["--gold-holdout", "1"]) == 1
    assert "--gold-holdout must be at least 0 and below 1" in capsys.readouterr().err
    assert main(["--synthetic-ratio", "-1"]) == 1
    assert "--synthetic-ratio must be at least 0.0" in capsys.readouterr().err


@pytest.mark.slow
def test_dpo_on_corrections_is_gated_and_registered(tiny_model_dir, dermaloop_home):
    from annotation_db import store as st
    from annotation_db.db import Store
    from training.refine.run import RefineConfig, run_refine

    settings = settings_for(dermaloop_home, tiny_model_dir)
    seeded = seed_store(settings, [(lesion(c), QUESTION, "No idea.", a) for c, a in zip(COLOURS, CORRECTIONS)], base=str(tiny_model_dir))
    evals = eval_file(dermaloop_home / "syn")
    cfg = RefineConfig(method="dpo", synthetic_eval=[str(evals)], **{**FAST, "steps": 10, "learning_rate": 1e-3, "save_steps": 5})
    outcome = run_refine(settings, cfg, progress=False, force=True)
    assert outcome.status == "promoted" and outcome.version == "v2", outcome.summary
    t = outcome.report["training"]
    assert t["preference_pairs"] == len(CORRECTIONS) and t["reward_margin_last"] > 0
    db = Store.open(settings.db_url)
    with db.session() as s:
        assert sorted(r.id for r in st.lineage(s, "v2")) == sorted(seeded["rating_ids"])
        adapter = st.get_version(s, "v2").adapter_path
    db.dispose()
    cfg_json = json.loads((Path(adapter) / "adapter_config.json").read_text())
    assert "lm_head" not in str(cfg_json["target_modules"])  # TRL's DPO cannot train a LoRA on lm_head


@pytest.mark.slow
def test_human_gate_waits_for_the_experts_blind_comparison(tiny_model_dir, dermaloop_home, capsys):
    from annotation_db import pairwise as pw
    from annotation_db import store as st
    from annotation_db.db import Store
    from annotation_db.models import Side
    from training.refine.run import RefineConfig, main, run_refine

    settings = settings_for(dermaloop_home, tiny_model_dir)
    seed_store(settings, [(lesion(c), QUESTION, "No idea.", a) for c, a in zip(COLOURS, CORRECTIONS)], base=str(tiny_model_dir))
    cfg = RefineConfig(synthetic_eval=[str(eval_file(dermaloop_home / "syn"))], synthetic_ratio=0.0, human_gate=3, **FAST)
    outcome = run_refine(settings, cfg, progress=False)
    assert outcome.status == "awaiting-experts", outcome.summary
    assert "3 cases wait for the experts' blind comparison" in outcome.summary
    assert versions(settings) == {"v1": "active", "v2": "candidate"}  # passed the metrics, not promoted yet

    db = Store.open(settings.db_url)
    with db.session() as s:
        expert = st.get_or_create_user(s, "dr-judge", "expert")
        first = pw.next_pair(s, expert.id)
        assert first is not None and first.image_hashes and "v2" not in first.answer_a + first.answer_b
        pw.record_preference(s, first.case_id, expert.id, "a" if pw.shown_first(first.case_id, expert.id) is Side.candidate else "b")
    assert main(["--min-new", "99"]) == 0  # a later refine settles first: one of three judged, so it waits
    assert "v2 waits for the experts: 1 of 3 blind comparisons judged" in capsys.readouterr().out
    with db.session() as s:
        while (pair := pw.next_pair(s, expert.id)) is not None:  # the expert prefers the candidate every time
            pw.record_preference(s, pair.case_id, expert.id, "a" if pw.shown_first(pair.case_id, expert.id) is Side.candidate else "b")
    assert main(["--min-new", "99"]) == 0
    assert "v2 promoted by the experts: blind pairwise review: candidate preferred 3, active 0, ties 0; win rate 1.00" in capsys.readouterr().out
    assert versions(settings) == {"v1": "retired", "v2": "active"}
    with db.session() as s:
        assert "experts' blind review" in st.get_version(s, "v2").status_reason
    db.dispose()
