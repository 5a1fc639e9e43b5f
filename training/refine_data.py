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

from training.data import Example, read_examples, report_problems


@dataclass
class DataPlan:
    train: list[Example]  # examples to train on (gold first, then synthetic)
    heldout: list[Example]  # the gate's evaluation set
    counts: dict[str, Any]
    rating_ids: list[int]  # the ratings behind the gold training pairs (lineage)
    synthetic_ids: list[str]  # the synthetic examples used
    preference_pairs: list[dict] = field(default_factory=list)  # chosen = correction, rejected = model answer
    new_gold: int = 0  # trainable gold pairs the active version has not learned from

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


def build_plan(s: Any, cfg: Any, *, images_dir: Path, active_version_id: int | None) -> DataPlan:
    """Gather, split and mix the data for one run (writes new hashes into the store's split)."""
    from annotation_db import store as st
    from core.images import image_path

    roles = tuple(cfg.roles)
    gold = st.gold_pairs(s, accept_threshold=cfg.accept_threshold, roles=roles)
    new_ids = {p.turn_id for p in st.gold_pairs(s, accept_threshold=cfg.accept_threshold, roles=roles,
                                               since_version_id=active_version_id).pairs} if active_version_id else None
    missing = 0
    usable = []
    for p in gold.pairs:
        if not p.image_hashes:
            usable.append(p)  # a text-only question
            continue
        ex = gold_example(p, images_dir)
        if all(Path(x).is_file() for x in ex.images):
            usable.append(p)
        else:
            missing += 1
    hashes = sorted({h for p in usable for h in p.image_hashes})
    split = st.assign_split(s, hashes, holdout_fraction=cfg.gold_holdout, seed=cfg.seed) if hashes and cfg.gold_holdout > 0 else {}
    gold_train, gold_heldout, rating_ids = [], [], set()
    new_gold = 0
    for p in usable:
        ex = gold_example(p, images_dir)
        if any(split.get(h) == "heldout" for h in p.image_hashes):
            gold_heldout.append(ex)
        else:
            gold_train.append(ex)
            rating_ids.update(p.rating_ids)
            if new_ids is None or p.turn_id in new_ids:
                new_gold += 1

    synthetic = read_synthetic(cfg.synthetic)
    if cfg.synthetic_eval:
        syn_train, syn_heldout = synthetic, read_synthetic(cfg.synthetic_eval)
    elif synthetic and cfg.synthetic_holdout > 0:
        by_path = {str(p): image_hash(p) for ex in synthetic for p in ex.images}
        syn_split = st.assign_split(s, sorted(set(by_path.values())), holdout_fraction=cfg.synthetic_holdout, seed=cfg.seed)
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
         "rating_ids": list(p.rating_ids), "heldout": any(split.get(h) == "heldout" for h in p.image_hashes)}
        for p in gold.preference_pairs
    ]
    return DataPlan(train, heldout, counts, sorted(rating_ids), [ex.id for ex in syn_used], prefs, new_gold)
