"""build_plan: text-only gold pairs, the store's write lock during file reading, rejected retrains."""

from __future__ import annotations

import sqlite3

import pytest
import torch

from tests.test_refine import COLOURS, CORRECTIONS, QUESTION, lesion, seed_store, settings_for


def _store(settings):
    from annotation_db.db import Store

    return Store.open(settings.db_url)


def _add_text_only(settings, base: str) -> None:
    from annotation_db import store as st

    db = _store(settings)
    with db.session() as s:
        active = st.ensure_base_version(s, base)
        expert = st.get_or_create_user(s, "dr-expert", "expert")
        clin = st.get_or_create_user(s, "dr-asker", "clinician")
        conv = st.start_conversation(s, clin.id, {})
        turn = st.record_turn(s, conv.id, "Is SPF 30 enough?", "Use SPF 50.", image_hashes=[], template="free",
                              model_version_id=active.id)
        st.add_rating(s, turn.id, expert.id, 5)
    db.dispose()


def test_text_only_gold_pair_is_left_out_and_reported(tiny_model_dir, dermaloop_home, capsys):
    from training.errors import TrainingError
    from training.refine.collate import Features, collate
    from training.refine.data import build_plan
    from training.refine.run import RefineConfig, main

    settings = settings_for(dermaloop_home, tiny_model_dir)
    seed_store(settings, [(lesion(c), QUESTION, "No idea.", a) for c, a in zip(COLOURS[:3], CORRECTIONS)],
               base=str(tiny_model_dir))
    _add_text_only(settings, str(tiny_model_dir))
    db = _store(settings)
    plan = build_plan(db, RefineConfig(gold_holdout=0.0), images_dir=settings.images_dir, active_version_id=None)
    db.dispose()
    assert plan.counts["gold_pairs"] == 4 and plan.counts["gold_train"] == 3
    assert plan.counts["gold_text_only_skipped"] == 1
    assert all(ex.images for ex in plan.train)  # every training batch holds image examples only
    assert main(["--dry-run", "--gold-holdout", "0"]) == 0
    out = capsys.readouterr().out
    assert "gold_text_only_skipped: 1" in out and "1 text-only gold pair(s)" in out

    # collate never drops some examples' images silently, whichever example comes first.
    ids = torch.tensor([1, 2, 3])
    text = Features(ids, ids.clone(), {})
    image = Features(ids, ids.clone(), {"pixel_values": torch.zeros(1, 1, 3, 4, 4)})
    for batch in ([text, image], [image, text]):
        with pytest.raises(TrainingError, match="1 of 2 have images"):
            collate(batch, 0)
    assert "pixel_values" not in collate([text, text], 0)


def test_no_write_transaction_while_files_are_read(tiny_model_dir, dermaloop_home, monkeypatch):
    from annotation_db import store as st
    from training.data.examples import Example, write_jsonl
    from training.refine import data as refine_data
    from training.refine.run import RefineConfig

    settings = settings_for(dermaloop_home, tiny_model_dir)
    seed_store(settings, [(lesion(c), QUESTION, "No idea.", a) for c, a in zip(COLOURS[:2], CORRECTIONS)],
               base=str(tiny_model_dir))
    folder = dermaloop_home / "syn"
    folder.mkdir()
    examples = []
    for i, c in enumerate(COLOURS):
        lesion(c, size=48).save(folder / f"s{i}.png")
        examples.append(Example(f"s{i}", [str(folder / f"s{i}.png")], QUESTION, ["Naevus."], source="synthetic-qa"))
    write_jsonl(examples, folder / "syn.jsonl")
    db_path = settings.db_url.split("///", 1)[1]
    events: list[str] = []
    real_hash, real_assign = refine_data.image_hash, st.assign_split

    def hash_spy(path):
        # Another connection can start a write now: refine holds no write transaction.
        con = sqlite3.connect(db_path, timeout=0.05)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.rollback()
        except sqlite3.OperationalError as e:
            events.append(f"locked: {e}")
        finally:
            con.close()
        events.append("read")
        return real_hash(path)

    def assign_spy(s, hashes, **kw):
        events.append("assign")
        return real_assign(s, hashes, **kw)

    monkeypatch.setattr(refine_data, "image_hash", hash_spy)
    monkeypatch.setattr(st, "assign_split", assign_spy)
    cfg = RefineConfig(gold_holdout=0.5, synthetic=[str(folder / "syn.jsonl")], synthetic_holdout=0.5)
    db = _store(settings)
    plan = refine_data.build_plan(db, cfg, images_dir=settings.images_dir, active_version_id=None)
    db.dispose()
    assert "read" in events and "assign" in events
    assert not [e for e in events if e.startswith("locked")], events
    assert events.index("assign") > max(i for i, e in enumerate(events) if e == "read")  # files first, then writes
    assert plan.counts["synthetic_pool"] + plan.counts["synthetic_heldout"] == len(COLOURS)
    # The split was committed (a fresh connection sees it).
    con = sqlite3.connect(db_path)
    assert con.execute("SELECT count(*) FROM eval_split").fetchone()[0] == 2 + len(COLOURS)
    con.close()


def test_min_new_ignores_ratings_a_rejected_candidate_already_tried(tiny_model_dir, dermaloop_home, capsys):
    from annotation_db import store as st
    from training.refine.data import build_plan
    from training.refine.run import RefineConfig, main

    settings = settings_for(dermaloop_home, tiny_model_dir)
    seeded = seed_store(settings, [(lesion(c), QUESTION, "No idea.", a) for c, a in zip(COLOURS[:3], CORRECTIONS)],
                        base=str(tiny_model_dir))
    db = _store(settings)
    with db.session() as s:  # what a refine run whose candidate the gate rejected leaves in the store
        active = st.active_version(s)
        run = st.start_training_run(s, {"refine": {}})
        st.finish_training_run(s, run.id, status="completed", rating_ids=seeded["rating_ids"])
        v = st.register_version(s, base_model=str(tiny_model_dir), adapter_path=None, parent_id=active.id,
                                training_run_id=run.id)
        st.reject(s, v.id, "rejected by the gate: rougeL fell")
    assert main(["--min-new", "1", "--quiet", "--gold-holdout", "0"]) == 0
    assert "nothing to do: 0 new gold pair(s)" in capsys.readouterr().out
    assert {x.name for x in st.list_versions(db.sessionmaker())} == {"v1", "v2"}

    # A new rating is new again.
    seed_store(settings, [(lesion(COLOURS[4]), QUESTION, "No idea.", CORRECTIONS[4])], base=str(tiny_model_dir))
    with db.session() as s:
        active_id = st.active_version(s).id
    plan = build_plan(db, RefineConfig(gold_holdout=0.0), images_dir=settings.images_dir, active_version_id=active_id)
    assert plan.new_gold == 1 and plan.counts["gold_train"] == 4
    db.dispose()


def test_blind_preferences_become_dpo_pairs_but_never_from_the_gates_cases(tiny_model_dir, dermaloop_home):
    from annotation_db import pairwise as pw
    from annotation_db import store as st
    from annotation_db.models import Side
    from core.images import intake
    from training.refine.data import build_plan
    from training.refine.run import RefineConfig

    settings = settings_for(dermaloop_home, tiny_model_dir)
    seeded = seed_store(settings, [(lesion(COLOURS[0]), QUESTION, "No idea.", CORRECTIONS[0])], base=str(tiny_model_dir))
    gate_image = intake(lesion(COLOURS[1]), settings.images_dir).sha256  # a synthetic held-out image of a gate
    db = _store(settings)
    with db.session() as s:
        v1 = st.active_version(s)
        v2 = st.register_version(s, base_model=str(tiny_model_dir))
        expert = st.get_or_create_user(s, "dr-judge", "expert")
        cases = [pw.CaseIn(QUESTION, "Melanoma.", "Naevus.", image_hashes=[h], key=k)
                 for h, k in ((seeded["hashes"][0], "trained-image"), (gate_image, "gate-case"))]
        pw.add_pairwise_cases(s, cases, candidate=v2.id, active=v1.id, batch="on-demand")
        while (pair := pw.next_pair(s, expert.id)) is not None:  # the candidate preferred each time
            pw.record_preference(s, pair.case_id, expert.id, "a" if pw.shown_first(pair.case_id, expert.id) is Side.candidate else "b")
    plan = build_plan(db, RefineConfig(gold_holdout=0.0), images_dir=settings.images_dir, active_version_id=None)
    db.dispose()
    blind = [p for p in plan.preference_pairs if p["chosen"] == "Melanoma."]
    assert plan.counts["pairwise_preference_pairs"] == 2 and len(blind) == 2
    assert all(p["rejected"] == "Naevus." and p["rating_ids"] == [] for p in blind)
    assert sorted(p["heldout"] for p in blind) == [False, True]  # the gate's case is never trained on
    trained = next(p for p in blind if not p["heldout"])
    assert seeded["hashes"][0] in trained["images"][0]
    # lineage: the run records the judgement it trains on, so an erasure can name the version
    from training.refine.register import _dpo_lineage

    assert _dpo_lineage(plan, "preference_ids") == trained["preference_ids"] and len(trained["preference_ids"]) == 1
