"""gold_pairs (one SQL query per call) against a plain reference kept here, on a random store."""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict

import pytest
from sqlalchemy import select

from annotation_db import store
from annotation_db.models import Rating, Turn
from annotation_db.store import GoldConflict, GoldPair, GoldResult, PreferencePair, as_utc

from conftest import h


def reference_gold_pairs(s, accept_threshold=4.0, roles=("expert", "admin"), since_version_id=None) -> GoldResult:
    """The definition, row by row in Python: the effective rating is each rater's latest full one."""
    known = {r.id for r in store.lineage(s, since_version_id)} if since_version_id else set()
    latest = {}
    for r in s.scalars(select(Rating).order_by(Rating.id)):
        if r.kind.value == "full" and r.rater.role.value in roles:
            latest[r.turn_id, r.rater_id] = r
    by_turn = defaultdict(list)
    for r in sorted(latest.values(), key=lambda r: r.id):
        by_turn[r.turn_id].append(r)
    out = GoldResult()
    for turn_id in sorted(by_turn):
        rs, turn = by_turn[turn_id], s.get(Turn, turn_id)
        ids = [r.id for r in rs]
        if known and set(ids) <= known:
            continue
        mean = sum(r.score for r in rs) / len(rs)
        label = next((r.diagnosis for r in reversed(rs) if r.diagnosis is not None), None)  # the latest label
        corrected = [r for r in rs if r.correction is not None]
        if len({r.correction.strip() for r in corrected}) > 1:
            out.conflicts.append(GoldConflict(turn_id, [r.id for r in corrected],
                                              [r.correction for r in corrected], corrected[-1].id))
        if corrected and turn.status.value != "error":
            source, target = "expert", corrected[-1].correction
        elif not corrected and mean >= accept_threshold and turn.status.value == "complete":
            source, target = "accepted", turn.answer
        else:
            if not corrected:
                out.left_out.append(turn_id)
            continue
        hashes = list(dict.fromkeys(sha for t in store.conversation_history(s, turn.conversation_id)
                                    if t.seq <= turn.seq for sha in t.image_hashes))
        common = dict(turn_id=turn_id, image_hashes=hashes, question=turn.question,
                      context=turn.conversation.context or {}, template=turn.template, rating_ids=ids,
                      model_version_id=turn.model_version_id, created=as_utc(turn.created_at))
        out.pairs.append(GoldPair(**common, conversation_id=turn.conversation_id, seq=turn.seq, target=target,
                                  source=source, model_answer=turn.answer, mean_score=mean, label=label))
        if source == "expert" and target.strip() != turn.answer.strip():
            out.preference_pairs.append(PreferencePair(**common, chosen=target, rejected=turn.answer))
    return out


def as_tuples(g: GoldResult):
    return ([dataclasses.astuple(p) for p in g.pairs], [dataclasses.astuple(p) for p in g.preference_pairs],
            [dataclasses.astuple(c) for c in g.conflicts], g.left_out, g.rating_ids)


@pytest.mark.parametrize("seed", [0, 1])
def test_gold_pairs_match_the_reference_on_a_random_store(db, seed):
    rng = random.Random(seed)
    corrections = ["Melanoma; refer.", "Melanoma; refer. ", " Melanoma; refer.", "Nevus.", "Nevus.\n", "BCC"]
    with db.session() as s:
        doc = store.get_or_create_user(s, "doc", "clinician").id
        raters = [store.get_or_create_user(s, f"e{i}").id for i in range(4)]
        raters += [store.get_or_create_user(s, "admin", "admin").id, doc]
        v1 = store.ensure_base_version(s, "base")
        for i in range(6):
            store.record_image(s, h(i), 8, 8)
        turns = []
        for c in range(15):
            conv = store.start_conversation(s, doc, {"age": c} if c % 3 else None).id
            for _ in range(rng.randint(1, 3)):
                turns.append(store.record_turn(
                    s, conv, f"q{len(turns)}", rng.choice(["Nevus.", "Nevus. ", "A lentigo."]),
                    image_hashes=rng.sample([h(i) for i in range(6)], rng.randint(0, 2)), template="qa",
                    model_version_id=v1.id, status=rng.choice(["complete"] * 4 + ["stopped", "error"])).id)

        def rate(n):
            for _ in range(n):
                rater = rng.choice(raters)
                if rater == doc or rng.random() < 0.1:
                    store.add_rating(s, rng.choice(turns), rater, rng.choice([1, 5]), kind="thumbs")
                else:
                    store.add_rating(s, rng.choice(turns), rater, rng.randint(1, 5),
                                     correction=rng.choice(corrections) if rng.random() < 0.4 else None,
                                     diagnosis=rng.choice(["melanoma", "nevus", None, None]))

        rate(120)
        versions = [v1.id]
        for _ in range(2):  # two refine rounds: each learns from some of the pairs, then more ratings come
            g = store.gold_pairs(s, since_version_id=versions[-1])
            run = store.start_training_run(s, {})
            used = [i for p in g.pairs if rng.random() < 0.7 for i in p.rating_ids]
            store.finish_training_run(s, run.id, status="completed", counts={}, rating_ids=used,
                                      synthetic_ids=[], report={})
            versions.append(store.register_version(s, base_model="base", parent_id=versions[-1],
                                                   training_run_id=run.id).id)
            rate(60)
        cases = [{}, {"accept_threshold": 3.0}, {"accept_threshold": 5}, {"roles": ("expert", "admin")},
                 {"roles": ("admin",)}] + [{"since_version_id": v} for v in versions]
        for kw in cases:
            got, want = store.gold_pairs(s, **kw), reference_gold_pairs(s, **kw)
            assert as_tuples(got) == as_tuples(want), kw
        everything = store.gold_pairs(s)
        assert everything.pairs and everything.conflicts and everything.preference_pairs and everything.left_out
        assert {p.label for p in everything.pairs} >= {"melanoma", "nevus", None}  # the experts' labels flow in
        assert len(store.gold_pairs(s, since_version_id=versions[-1]).pairs) < len(everything.pairs)
