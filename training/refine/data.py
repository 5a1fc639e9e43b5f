"""What a refine run learns from and is judged on: gold pairs from the store plus synthetic QA.

- Gold pairs (`annotation_db.store.gold_pairs`): an expert correction wins; an answer
  rated at or above the threshold with no correction is accepted as it is; only the
  configured rater roles count.
- The store's frozen evaluation split (by image hash, `assign_split`) decides which
  gold pairs are held out (`gold_holdout`; 0 trains on every gold pair). Synthetic
  datasets are split the same way (`synthetic_holdout`) unless explicit evaluation
  datasets are given (`synthetic_eval`), which are then the synthetic held-out set.
- `synthetic_ratio` R: R synthetic examples per gold training pair, drawn with the
  run's seed (every synthetic example when there is no gold pair yet).
- New gold pairs = trainable pairs the active version has not learned from
  (`since_version_id`): the `--min-new` check counts these.

Only the main process calls `build_plan` (it writes the split); the plan is saved
as JSON in the run folder and every process (and a resumed run) reads it back.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from training.data.examples import Example, read_examples, report_problems


@dataclass
class DataPlan:
    train: list[Example]  # examples to train on (gold first, then synthetic)
    heldout: list[Example]  # the gate's evaluation set
    counts: dict[str, Any]
    rating_ids: list[int]  # the ratings behind the gold training pairs (lineage)
    synthetic_ids: list[str]  # the synthetic examples used
    preference_pairs: list[dict] = field(default_factory=list)  # chosen = correction, rejected = model answer
    new_gold: int = 0  # trainable gold pairs the active version has not learned from
    new_ids: list[str] = field(default_factory=list)  # their example ids (the gate's in-sample check)

    def to_json(self) -> str:
        d = asdict(self)
        d["train"] = [ex.to_dict() for ex in self.train]
        d["heldout"] = [ex.to_dict() for ex in self.heldout]
        return json.dumps(d, indent=1, default=str)

    @classmethod
    def from_json(cls, text: str) -> "DataPlan":
        d = json.loads(text)
        d["train"] = [Example(**ex) for ex in d["train"]]
        d["heldout"] = [Example(**ex) for ex in d["heldout"]]
        return cls(**d)


def gold_example(pair: Any, images_dir: Path) -> Example:
    from core.images import image_path

    return Example(
        id=f"turn-{pair.turn_id}",
        images=[str(image_path(images_dir, h)) for h in pair.image_hashes],
        question=pair.question,
        answers=[pair.target],
        context=pair.context or None,
        source=pair.source,
        template=pair.template or "free",
        label=pair.label,  # the experts' diagnosis label, when one was given
    )


def read_synthetic(paths: Sequence[str]) -> list[Example]:
    out: list[Example] = []
    for p in paths:
        examples, problems = read_examples(p)
        report_problems(problems, len(examples))
        for ex in examples:
            if ex.source in ("expert", "accepted"):
                ex.source = "synthetic-qa"  # a file given as --synthetic is synthetic, whatever it says
            out.append(ex)
    return out


def image_hash(path: str | Path) -> str:
    from core.images import normalise

    return normalise(Path(path))[1]


def tried_rating_ids(s: Any, active: Any) -> set[int]:
    """Ratings already tried by candidates rejected since `active` became active (None: every rejected one).

    Those candidates' runs learned from these ratings and the gate turned them down; retraining
    on the same ratings would only repeat that, so they do not count as new for `--min-new`.
    """
    from annotation_db import store as st

    since = getattr(active, "status_changed_at", None) if active is not None else None
    out: set[int] = set()
    for v in st.list_versions(s):
        if v.status.value != "rejected" or v.training_run_id is None:
            continue
        if since is not None and (v.status_changed_at is None or v.status_changed_at < since):
            continue
        out |= {r.id for r in st.lineage(s, v.id, ancestors=False)}
    return out


def build_plan(db: Any, cfg: Any, *, images_dir: Path, active_version_id: int | None, dry_run: bool = False) -> DataPlan:
    """Gather, split and mix the data for one run (writes new hashes into the store's split).

    Order matters for the app that shares the store: read the store (no write), then read
    and hash every file, and only then take the write lock, in a short session of its own
    that assigns the split of new images and commits at once (a dry run rolls it back).
    """
    from annotation_db import store as st
    from core.images import image_path

    roles = tuple(cfg.roles)
    # 1. Store reads only.
    with db.session() as s:
        gold = st.gold_pairs(s, accept_threshold=cfg.accept_threshold, roles=roles)
        active = st.get_version(s, active_version_id) if active_version_id else None
        new_ids = {p.turn_id for p in st.gold_pairs(s, accept_threshold=cfg.accept_threshold, roles=roles,
                                                   since_version_id=active_version_id).pairs} if active else None
        tried = tried_rating_ids(s, active)
        from annotation_db.pairwise import pairwise_preference_pairs

        pairwise = pairwise_preference_pairs(s)  # the experts' blind A/B preferences (and their corrections)
        s.rollback()
    # 2. Files: no store transaction is open here.
    missing = text_only = 0
    usable = []
    for p in gold.pairs:
        if not p.image_hashes:
            text_only += 1  # a question asked without an image: the image batches cannot hold it
            continue
        ex = gold_example(p, images_dir)
        if all(Path(x).is_file() for x in ex.images):
            usable.append(p)
        else:
            missing += 1
    hashes = sorted({h for p in usable for h in p.image_hashes})
    synthetic = read_synthetic(cfg.synthetic)
    syn_eval = read_synthetic(cfg.synthetic_eval) if cfg.synthetic_eval else None
    by_path: dict[str, str] = {}
    if syn_eval is None and synthetic and cfg.synthetic_holdout > 0:
        by_path = {str(p): image_hash(p) for ex in synthetic for p in ex.images}
    # 3. One short write transaction for the split, committed at once.
    split: dict[str, str] = {}
    syn_split: dict[str, str] = {}
    if (hashes and cfg.gold_holdout > 0) or by_path:
        with db.session() as s:
            if hashes and cfg.gold_holdout > 0:
                split = st.assign_split(s, hashes, holdout_fraction=cfg.gold_holdout, seed=cfg.seed)
            if by_path:
                syn_split = st.assign_split(s, sorted(set(by_path.values())), holdout_fraction=cfg.synthetic_holdout,
                                            seed=cfg.seed)
            if dry_run:
                s.rollback()  # a dry run writes nothing (not even the split of new images)
    # 4. Compose the plan (no store access).
    gold_train, gold_heldout, rating_ids = [], [], set()
    new_train_ids = []
    for p in usable:
        ex = gold_example(p, images_dir)
        if any(split.get(h) == "heldout" for h in p.image_hashes):
            gold_heldout.append(ex)
        else:
            gold_train.append(ex)
            rating_ids.update(p.rating_ids)
            if (new_ids is None or p.turn_id in new_ids) and set(p.rating_ids) - tried:
                new_train_ids.append(ex.id)
    new_gold = len(new_train_ids)

    if syn_eval is not None:
        syn_train, syn_heldout = synthetic, syn_eval
    elif by_path:
        held = lambda ex: any(syn_split.get(by_path[str(p)]) == "heldout" for p in ex.images)  # noqa: E731
        syn_train = [ex for ex in synthetic if not held(ex)]
        syn_heldout = [ex for ex in synthetic if held(ex)]
    else:
        syn_train, syn_heldout = synthetic, []
    rng = random.Random(cfg.seed)
    if gold_train and cfg.synthetic_ratio >= 0:
        want = round(cfg.synthetic_ratio * len(gold_train))
        syn_used = rng.sample(syn_train, min(want, len(syn_train)))
    else:
        syn_used = list(syn_train)
    heldout = gold_heldout + syn_heldout
    if cfg.eval_max and len(heldout) > cfg.eval_max:
        # Gold first (what experts said), then a seeded sample of the synthetic held-out set.
        room = max(0, cfg.eval_max - len(gold_heldout))
        heldout = gold_heldout[: cfg.eval_max] + random.Random(cfg.seed + 1).sample(syn_heldout, min(room, len(syn_heldout)))
    train = gold_train + syn_used
    by_source: dict[str, int] = {}
    for ex in train:
        by_source[ex.source] = by_source.get(ex.source, 0) + 1
    counts = {
        "gold_pairs": len(gold.pairs),
        "gold_train": len(gold_train),
        "gold_heldout": len(gold_heldout),
        "gold_new": new_gold,
        "gold_missing_images": missing,
        "gold_text_only_skipped": text_only,  # asked without an image: not trained on (image batches only)
        "gold_conflicts": len(gold.conflicts),
        "gold_left_out": len(gold.left_out),
        "preference_pairs": len(gold.preference_pairs),
        "synthetic_pool": len(syn_train),
        "synthetic_used": len(syn_used),
        "synthetic_heldout": len(syn_heldout),
        "train_examples": len(train),
        "eval_examples": len(heldout),
        "train_by_source": by_source,
    }
    prefs = [
        {"turn_id": p.turn_id, "images": [str(image_path(images_dir, h)) for h in p.image_hashes], "question": p.question,
         "context": p.context or None, "template": p.template, "chosen": p.chosen, "rejected": p.rejected,
         "rating_ids": list(p.rating_ids), "preference_ids": [], "heldout": any(split.get(h) == "heldout" for h in p.image_hashes)}
        for p in gold.preference_pairs if p.image_hashes  # text-only pairs are left out, as for SFT
    ]
    # A blind comparison trains only on images of the gold training split: the gate's own cases (held-out
    # gold, or synthetic held-out images the store has no split for) never become training data.
    trainable = {h for h in hashes if split.get(h) != "heldout"}
    prefs += [
        {"turn_id": p.turn_id, "images": [str(image_path(images_dir, h)) for h in p.image_hashes], "question": p.question,
         "context": p.context or None, "template": p.template, "chosen": p.chosen, "rejected": p.rejected,
         "rating_ids": [], "preference_ids": [p.preference_id], "heldout": not set(p.image_hashes) <= trainable}
        for p in pairwise if p.image_hashes
    ]
    counts["pairwise_preference_pairs"] = len(pairwise)
    return DataPlan(train, heldout, counts, sorted(rating_ids), [ex.id for ex in syn_used], prefs, new_gold, new_train_ids)
