"""Gold pairs: the effective expert ratings of every turn resolved into one training target.

    from annotation_db import store
    with db.session() as s:
        result = store.gold_pairs(s, accept_threshold=4.0)   # GoldResult: pairs, conflicts, preference pairs

What `training.refine` learns from and holds out for the gate. Re-exported from `store`.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import String, case, cast, func, select
from sqlalchemy.orm import Session, aliased

from ._util import as_utc
from .models import RATER_ROLES, Conversation, Rating, RatingKind, Role, TrainingRunRating, Turn, TurnStatus, User
from .store import _turn_images, images_up_to, is_effective


@dataclass(frozen=True)
class GoldPair:
    turn_id: int
    conversation_id: int
    seq: int  # position in the conversation; earlier turns: conversation_history()
    image_hashes: list[str]
    question: str
    context: dict[str, Any]
    template: str
    target: str
    source: str  # "expert" (a correction) or "accepted" (the model answer, rated well)
    rating_ids: list[int]
    model_answer: str
    model_version_id: int | None
    created: datetime
    mean_score: float
    label: str | None = None  # the experts' diagnosis label (the most recent effective one), if any


@dataclass(frozen=True)
class PreferencePair:
    turn_id: int
    image_hashes: list[str]
    question: str
    context: dict[str, Any]
    template: str
    chosen: str  # the expert's correction
    rejected: str  # the model's answer
    rating_ids: list[int]
    model_version_id: int | None
    created: datetime


@dataclass(frozen=True)
class GoldConflict:
    turn_id: int
    rating_ids: list[int]  # the effective ratings whose corrections differ
    corrections: list[str]
    chosen_rating_id: int  # the most recent, which wins


@dataclass
class GoldResult:
    pairs: list[GoldPair] = field(default_factory=list)
    conflicts: list[GoldConflict] = field(default_factory=list)
    preference_pairs: list[PreferencePair] = field(default_factory=list)
    left_out: list[int] = field(default_factory=list)  # turn ids rated below threshold, uncorrected

    @property
    def rating_ids(self) -> list[int]:
        return sorted({i for p in self.pairs for i in p.rating_ids})


def _effective(roles: Sequence[Role], turn_ids: Sequence[int] | None = None):
    """The effective full ratings (`is_effective`) of raters in `roles`, in turn order (no sort needed)."""
    q = (
        select(Rating.turn_id, Rating.id, Rating.score, Rating.correction, Rating.diagnosis)
        .join(User, User.id == Rating.rater_id)
        .where(Rating.kind == RatingKind.full, User.role.in_(roles), is_effective())
    )
    return q if turn_ids is None else q.where(Rating.turn_id.in_(turn_ids))


def gold_pairs(s: Session, *, accept_threshold: float = 4.0,
               roles: Sequence[str] = RATER_ROLES, since_version_id: int | None = None) -> GoldResult:
    """Resolve the effective expert ratings of every turn into one training target.

    A correction wins (the most recent if experts disagree: reported as a conflict,
    and also kept as a preference pair chosen=correction, rejected=model answer);
    an uncorrected answer whose mean score is >= `accept_threshold` is accepted as it
    is; the rest are left out. With `since_version_id`, only pairs that version has
    not learned from (rating ids outside its lineage, ancestors included).

    One query resolves every turn in the database (its effective ratings counted,
    summed and listed, the winning correction joined in), so Python only builds the
    results; a second fetches the images, a third the rare possible conflicts.
    """
    roles_ = [Role(r) for r in roles]
    eff = _effective(roles_).subquery()
    win, lab = aliased(Rating), aliased(Rating)
    per_turn = [
        eff.c.turn_id,
        func.count().label("n"),
        func.sum(eff.c.score).label("total"),
        func.aggregate_strings(cast(eff.c.id, String), ",").label("ids"),
        func.max(case((eff.c.correction.is_not(None), eff.c.id))).label("win_id"),
        func.max(case((eff.c.diagnosis.is_not(None), eff.c.id))).label("label_id"),
        # two different corrections at least (no DISTINCT, so no sort: checked in Python)
        (func.min(eff.c.correction) != func.max(eff.c.correction)).label("differ"),
    ]
    q = select(*per_turn).group_by(eff.c.turn_id)
    if since_version_id is not None:
        from .versions import _run_ids

        runs = _run_ids(s, since_version_id, ancestors=True)
        if runs:  # keep a turn unless that version learned from all its effective ratings
            known = (select(TrainingRunRating.rating_id).where(TrainingRunRating.run_id.in_(runs))
                     .distinct().subquery())
            q = (q.select_from(eff.outerjoin(known, known.c.rating_id == eff.c.id))
                 .having(func.count(known.c.rating_id) < func.count()))
    r = q.subquery()
    rows = (
        select(r.c.turn_id, r.c.n, r.c.total, r.c.ids, r.c.differ, win.correction, lab.diagnosis.label("label"),
               Turn.conversation_id, Turn.seq, Turn.question, Turn.answer, Turn.template, Turn.status,
               Turn.model_version_id, Turn.created_at, Conversation.context)
        .join(Turn, Turn.id == r.c.turn_id)
        .join(Conversation, Conversation.id == Turn.conversation_id)
        .outerjoin(win, win.id == r.c.win_id)
        .outerjoin(lab, lab.id == r.c.label_id)
        .where(Conversation.erased_at.is_(None))  # an erased conversation teaches nothing
        .order_by(r.c.turn_id)
    )
    with _gc_paused():
        result, maybe_conflicts = _build(s, s.execute(rows).all(), accept_threshold)
    result.conflicts = _conflicts(s, roles_, maybe_conflicts)
    return result


@contextmanager
def _gc_paused():
    """No cyclic garbage collection while 100 000s of objects are built (none are cycles):
    otherwise the collector re-scans the growing heap again and again (a third of the time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _build(s: Session, rows: Sequence, accept_threshold: float) -> tuple[GoldResult, list[int]]:
    """The pairs, preference pairs and left-out turns from one row per rated turn, and the
    turns whose experts may have corrected differently."""
    result = GoldResult()
    kept, maybe_conflicts = [], []
    for row in rows:
        if row.differ:
            maybe_conflicts.append(row.turn_id)
        if row.correction is not None:
            if row.status is not TurnStatus.error:  # a correction wins on any turn but an error
                kept.append(row)
        elif row.total / row.n >= accept_threshold and row.status is TurnStatus.complete:
            kept.append(row)
        else:
            result.left_out.append(row.turn_id)
    images = _turn_images(s, {row.conversation_id for row in kept})
    for row in kept:
        ids = sorted(map(int, row.ids.split(",")))
        source, target = ("accepted", row.answer) if row.correction is None else ("expert", row.correction)
        hashes = images_up_to(images[row.conversation_id], row.seq)
        created, context = as_utc(row.created_at), row.context or {}
        result.pairs.append(GoldPair(
            turn_id=row.turn_id, conversation_id=row.conversation_id, seq=row.seq, image_hashes=hashes,
            question=row.question, context=context, template=row.template, target=target, source=source,
            rating_ids=ids, model_answer=row.answer, model_version_id=row.model_version_id, created=created,
            mean_score=row.total / row.n, label=row.label,
        ))
        if row.correction is not None and target.strip() != row.answer.strip():
            result.preference_pairs.append(PreferencePair(
                turn_id=row.turn_id, image_hashes=hashes, question=row.question, context=context,
                template=row.template, chosen=target, rejected=row.answer, rating_ids=ids,
                model_version_id=row.model_version_id, created=created,
            ))
    return result, maybe_conflicts


def _conflicts(s: Session, roles: list[Role], turn_ids: list[int]) -> list[GoldConflict]:
    """The turns whose effective corrections differ (beyond surrounding whitespace)."""
    out = []
    for i in range(0, len(turn_ids), 900):
        by_turn: dict[int, list] = defaultdict(list)
        for r in s.execute(_effective(roles, turn_ids[i:i + 900]).where(Rating.correction.is_not(None))
                           .order_by(Rating.turn_id, Rating.id)):
            by_turn[r.turn_id].append(r)
        for turn_id, rs in by_turn.items():
            if len({r.correction.strip() for r in rs}) > 1:
                out.append(GoldConflict(turn_id, [r.id for r in rs], [r.correction for r in rs], rs[-1].id))
    return out
