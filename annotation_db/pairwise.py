"""Blind pairwise review: two versions answer the same cases, experts say which answer is better.

    from annotation_db import pairwise as pw
    with db.session() as s:
        pw.add_pairwise_cases(s, [pw.CaseIn(question="What is this?", candidate_answer="...", active_answer="...",
                                            image_hashes=[sha], turn_id=None)],
                              candidate="v4", active="v3", batch="refine-20261124-r7")
        pair = pw.next_pair(s, rater_id)                    # PairToJudge: A and B, no version names
        done = pw.record_preference(s, pair.case_id, rater_id, "a", correction=None)
        done.version_a, done.winner                         # revealed after judging
        pw.pairwise_summary(s, batch="refine-20261124-r7")  # wins / losses / ties per (candidate, active)
        pw.pairwise_preference_pairs(s)                     # DPO pairs (chosen / rejected) for training

Which answer is shown as A is drawn per case and rater from a seeded hash
(`shown_first`), so a rater cannot learn a position, two raters see different
orders, and the same rater sees the same order again. Preferences are append-only
(the latest per case and rater counts) and keep the order shown, the choice as
clicked and the winner mapped back to the versions. A rater is never offered a
case they already judged, nor one that came from their own question unless
`include_own` (the app's `review_own_answers` setting). Cases from an erased
conversation are blanked by `erase.py` and skipped everywhere. The counts are
reported here; the win rate and its interval are the reader's (training's gate,
the Insights tab). Store functions take a `Session` first and never commit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from ._util import as_utc, check_hashes, check_int, check_json, check_text, write_lock
from .errors import Conflict, InvalidInput, NotFound
from .models import (
    RATER_ROLES,
    Choice,
    Conversation,
    ModelVersion,
    PairwiseCase,
    PairwisePreference,
    Side,
    Turn,
    User,
    Winner,
)

MAX_ANSWER_CHARS = 20_000
MAX_CORRECTION_CHARS = 8000  # as for ratings
MAX_COMMENT_CHARS = 4000
CHOICES = {"a": Choice.a, "b": Choice.b, "tie": Choice.tie}


@dataclass(frozen=True)
class CaseIn:
    """One case both versions answered (what `add_pairwise_cases` queues)."""

    question: str
    candidate_answer: str
    active_answer: str
    image_hashes: Sequence[str] = ()  # stored images (`<home>/images/<sha[:2]>/<sha>.png`), in order
    context: dict[str, Any] | None = None  # clinical context, as for a conversation
    template: str = "free"  # the prompt template both answered with
    turn_id: int | None = None  # the turn it came from, if any (own-answer rule, erasure)
    key: str | None = None  # unique within the batch; default "turn:<id>" or a digest of the case


@dataclass(frozen=True)
class Queued:
    case_ids: list[int]  # every case of the batch that was given, new or already there, in input order
    added: int
    existing: int
    skipped_erased: int  # cases whose turn's conversation was erased: not queued


@dataclass(frozen=True)
class PairToJudge:
    """A case as a rater sees it: A and B in this rater's order, no version names."""

    case_id: int
    batch: str
    question: str
    context: dict[str, Any]
    image_hashes: list[str]
    answer_a: str
    answer_b: str
    turn_id: int | None
    created: datetime


@dataclass(frozen=True)
class Judged:
    """A recorded preference, with the versions revealed."""

    preference_id: int
    case_id: int
    choice: str  # a | b | tie, as clicked
    winner: str  # candidate | active | tie
    version_a: str  # the version whose answer was shown as A
    version_b: str
    candidate: str
    active: str
    corrected: bool

    @property
    def message(self) -> str:
        said = {"a": "A better", "b": "B better", "tie": "a tie"}[self.choice]
        won = "neither (a tie)" if self.winner == "tie" else (self.candidate if self.winner == "candidate" else self.active)
        extra = ", with your correction" if self.corrected else ""
        return (f"✅ Saved: {said}{extra}. A was **{self.version_a}**, B was **{self.version_b}** "
                f"(candidate {self.candidate} vs active {self.active}); preferred: **{won}**.")


@dataclass(frozen=True)
class PairwiseSummary:
    """Effective preferences for one (candidate, active) pair of versions."""

    candidate: str
    active: str
    candidate_version_id: int
    active_version_id: int
    wins: int  # the candidate preferred
    losses: int  # the active preferred
    ties: int
    cases: int  # queued (not erased)
    judged_cases: int  # with at least one effective preference
    raters: int

    @property
    def judgements(self) -> int:
        return self.wins + self.losses + self.ties


@dataclass(frozen=True)
class PairwisePreferencePair:
    """A DPO pair from a pairwise preference (the shape of `gold.PreferencePair`, keyed by preference)."""

    case_id: int
    preference_id: int
    turn_id: int | None
    image_hashes: list[str]
    question: str
    context: dict[str, Any]
    template: str
    chosen: str
    rejected: str
    source: str  # "correction" (chosen = the expert's answer) or "preference" (chosen = the preferred answer)
    chosen_version_id: int | None  # None when chosen is the expert's correction
    rejected_version_id: int
    created: datetime


def shown_first(case_id: int, rater_id: int) -> Side:
    """Which version's answer this rater sees as A: seeded per (case, rater), the same in every process."""
    digest = hashlib.sha256(f"dermaloop-pairwise:{case_id}:{rater_id}".encode()).digest()
    return Side.candidate if digest[0] & 1 else Side.active


def _version(s: Session, ref: int | str, what: str) -> ModelVersion:
    from .versions import get_version

    try:
        return get_version(s, ref)
    except NotFound:
        raise NotFound(f"no model version {ref!r} ({what})") from None


def _key(c: CaseIn, hashes: list[str], context: dict) -> str:
    if c.key is not None:
        return check_text(c.key, "case key", max_len=200)
    if c.turn_id is not None:
        return f"turn:{c.turn_id}"
    blob = json.dumps([hashes, c.question, context, c.template], sort_keys=True, ensure_ascii=False)
    return "case:" + hashlib.sha256(blob.encode()).hexdigest()[:40]


def add_pairwise_cases(s: Session, cases: Iterable[CaseIn], *, candidate: int | str, active: int | str,
                       batch: str) -> Queued:
    """Queue cases for blind review of `candidate` against `active` (ids or names) under `batch`.

    Idempotent per (batch, key): a case already queued is not added again (a resumed refine
    may call this twice). A case from a turn of an erased conversation is skipped."""
    batch = check_text(batch, "batch name", max_len=100)
    cand, act = _version(s, candidate, "candidate"), _version(s, active, "active")
    if cand.id == act.id:
        raise InvalidInput(f"a version cannot be compared with itself ({cand.name})")
    write_lock(s)  # no erasure runs between the check below and the insert; two refines never both insert a key
    ids, added, existing, erased = [], 0, 0, 0
    for c in cases:
        if not isinstance(c, CaseIn):
            raise InvalidInput(f"pairwise cases are CaseIn records, got {type(c).__name__}")
        question = check_text(c.question, "question")
        answers = [check_text(a, f"{who} answer", allow_blank=True, max_len=MAX_ANSWER_CHARS)
                   for who, a in (("candidate", c.candidate_answer), ("active", c.active_answer))]
        hashes, context = check_hashes(c.image_hashes), check_json(c.context, "clinical context")
        template = check_text(c.template, "prompt template", max_len=200)
        if c.turn_id is not None:
            check_int(c.turn_id, "turn id", lo=1)
            turn = s.get(Turn, c.turn_id)
            if turn is None:
                raise NotFound(f"no turn with id {c.turn_id}")
            if turn.conversation.erased_at is not None:
                erased += 1
                continue
        key = _key(c, hashes, context)
        row = s.scalar(select(PairwiseCase).where(PairwiseCase.batch == batch, PairwiseCase.key == key))
        if row is not None:
            if (row.candidate_version_id, row.active_version_id) != (cand.id, act.id):
                raise Conflict(f"case {key!r} of batch {batch!r} compares other versions; use another batch name")
            ids.append(row.id)
            existing += 1
            continue
        row = PairwiseCase(batch=batch, key=key, turn_id=c.turn_id, image_hashes=hashes, question=question,
                           context=context, template=template, candidate_version_id=cand.id, active_version_id=act.id,
                           candidate_answer=answers[0], active_answer=answers[1])
        s.add(row)
        s.flush()
        ids.append(row.id)
        added += 1
    return Queued(ids, added, existing, erased)


def _rater(s: Session, rater_id: int) -> User:
    rater = s.get(User, rater_id)
    if rater is None:
        raise NotFound(f"no user with id {rater_id}")
    if rater.role.value not in RATER_ROLES:
        raise InvalidInput(f"{rater.name} is a {rater.role.value}: only experts judge answers side by side")
    return rater


def _open_cases(rater_id: int, *, need: int, include_own: bool, batch: str | None, skip: Iterable[int]):
    """The cases `rater_id` may be offered: not erased, not judged by them, fewer than `need` raters,
    not from their own question unless `include_own`, optionally one batch, none in `skip`."""
    mine = select(PairwisePreference.id).where(PairwisePreference.case_id == PairwiseCase.id,
                                               PairwisePreference.rater_id == rater_id)
    raters = (select(func.count(func.distinct(PairwisePreference.rater_id)))
              .where(PairwisePreference.case_id == PairwiseCase.id).scalar_subquery())
    q = (select(PairwiseCase).outerjoin(Turn, Turn.id == PairwiseCase.turn_id)
         .outerjoin(Conversation, Conversation.id == Turn.conversation_id)
         .where(PairwiseCase.erased_at.is_(None), ~mine.exists(), raters < need))
    if not include_own:
        q = q.where((PairwiseCase.turn_id.is_(None)) | (Conversation.user_id != rater_id))
    if batch is not None:
        q = q.where(PairwiseCase.batch == batch)
    skip = [int(i) for i in skip]
    if skip:
        q = q.where(PairwiseCase.id.not_in(skip))
    return q


def next_pair(s: Session, rater_id: int, *, need: int = 1, include_own: bool = False, batch: str | None = None,
              skip: Iterable[int] = ()) -> PairToJudge | None:
    """The oldest case this rater may judge (see `_open_cases`), as A and B in their order; None if none."""
    check_int(need, "need", lo=1, hi=1000)
    rater = _rater(s, rater_id)
    case = s.scalar(_open_cases(rater.id, need=need, include_own=include_own, batch=batch, skip=skip)
                    .order_by(PairwiseCase.id).limit(1))
    if case is None:
        return None
    first = shown_first(case.id, rater.id)
    a, b = ((case.candidate_answer, case.active_answer) if first is Side.candidate
            else (case.active_answer, case.candidate_answer))
    return PairToJudge(case.id, case.batch, case.question, dict(case.context or {}), list(case.image_hashes),
                       a, b, case.turn_id, as_utc(case.created_at))


def pairs_left(s: Session, rater_id: int, *, need: int = 1, include_own: bool = False, batch: str | None = None,
               skip: Iterable[int] = ()) -> int:
    """How many cases wait for this rater (what `next_pair` would go through)."""
    q = _open_cases(rater_id, need=need, include_own=include_own, batch=batch, skip=skip).subquery()
    return s.scalar(select(func.count()).select_from(q))


def record_preference(s: Session, case_id: int, rater_id: int, choice: str, *, correction: str | None = None,
                      comment: str | None = None, include_own: bool = False) -> Judged:
    """Append `rater_id`'s judgement of a case: `choice` "a", "b" or "tie" as shown to them (the order
    is recomputed here, never taken from the page), optionally with a correction (the answer they
    would give). Returns it with the versions revealed."""
    choice_ = CHOICES.get(str(choice).strip().lower()) if isinstance(choice, str) else None
    if choice_ is None:
        raise InvalidInput(f"a pairwise choice is 'a', 'b' or 'tie', not {choice!r}")
    correction = check_text(correction, "correction", required=False, max_len=MAX_CORRECTION_CHARS)
    comment = check_text(comment, "comment", required=False, allow_blank=True, max_len=MAX_COMMENT_CHARS)
    rater = _rater(s, rater_id)
    case = s.get(PairwiseCase, case_id)
    if case is None:
        raise NotFound(f"no pairwise case with id {case_id}")
    if case.erased_at is not None:
        raise Conflict(f"pairwise case {case_id} was erased and can no longer be judged")
    if case.turn_id is not None and not include_own:
        owner = s.scalar(select(Conversation.user_id).join(Turn, Turn.conversation_id == Conversation.id)
                         .where(Turn.id == case.turn_id))
        if owner == rater.id:
            raise InvalidInput("this case comes from your own question; judging it needs the review_own_answers setting")
    first = shown_first(case.id, rater.id)
    if choice_ is Choice.tie:
        winner = Winner.tie
    else:
        winner = Winner(first.value) if choice_ is Choice.a else Winner(Side.active.value if first is Side.candidate
                                                                         else Side.candidate.value)
    preferred = {Winner.candidate: case.candidate_version_id, Winner.active: case.active_version_id}.get(winner)
    pref = PairwisePreference(case_id=case.id, rater_id=rater.id, shown_first=first, choice=choice_, winner=winner,
                              preferred_version_id=preferred, correction=correction, comment=comment)
    s.add(pref)
    s.flush()
    cand, act = case.candidate_version.name, case.active_version.name
    va, vb = (cand, act) if first is Side.candidate else (act, cand)
    return Judged(pref.id, case.id, choice_.value, winner.value, va, vb, cand, act, correction is not None)


def _effective():
    """The latest preference of each rater on each case (append-only: the latest counts)."""
    later = aliased(PairwisePreference)
    return ~select(later.id).where(later.case_id == PairwisePreference.case_id,
                                   later.rater_id == PairwisePreference.rater_id, later.id > PairwisePreference.id).exists()


def pairwise_summary(s: Session, *, batch: str | None = None, candidate: int | str | None = None,
                     active: int | str | None = None) -> list[PairwiseSummary]:
    """Wins, losses and ties of each (candidate, active) pair from the effective preferences on cases
    that are not erased; optionally one batch or one pair of versions. Pairs with queued cases but no
    judgement yet are listed with zeros. One vote per (case, rater)."""
    cond = [PairwiseCase.erased_at.is_(None)]
    if batch is not None:
        cond.append(PairwiseCase.batch == batch)
    if candidate is not None:
        cond.append(PairwiseCase.candidate_version_id == _version(s, candidate, "candidate").id)
    if active is not None:
        cond.append(PairwiseCase.active_version_id == _version(s, active, "active").id)
    pair = (PairwiseCase.candidate_version_id, PairwiseCase.active_version_id)
    queued = {(r[0], r[1]): r[2] for r in s.execute(select(*pair, func.count()).where(*cond).group_by(*pair))}
    votes = s.execute(
        select(*pair, PairwisePreference.winner, func.count())
        .join(PairwisePreference, PairwisePreference.case_id == PairwiseCase.id)
        .where(*cond, _effective()).group_by(*pair, PairwisePreference.winner)
    ).all()
    judged = {(r[0], r[1]): r[2:] for r in s.execute(
        select(*pair, func.count(func.distinct(PairwisePreference.case_id)),
               func.count(func.distinct(PairwisePreference.rater_id)))
        .join(PairwisePreference, PairwisePreference.case_id == PairwiseCase.id).where(*cond).group_by(*pair))}
    tally: dict[tuple[int, int], dict[Winner, int]] = {k: {} for k in queued}
    for c, a, winner, n in votes:
        tally.setdefault((c, a), {})[winner] = n
    names = dict(s.execute(select(ModelVersion.id, ModelVersion.name)).all())
    out = []
    for (c, a), t in sorted(tally.items()):
        cases_judged, raters = judged.get((c, a), (0, 0))
        out.append(PairwiseSummary(names[c], names[a], c, a, t.get(Winner.candidate, 0), t.get(Winner.active, 0),
                                   t.get(Winner.tie, 0), queued.get((c, a), 0), cases_judged, raters))
    return out


def pairwise_preference_pairs(s: Session, *, batch: str | None = None,
                              corrections_only: bool = False) -> list[PairwisePreferencePair]:
    """DPO pairs from the effective preferences (cases not erased), oldest first.

    With a correction: chosen = the correction, rejected = each of the two answers that differs
    from it (the expert wrote what neither said). Without one (unless `corrections_only`), and not
    a tie: chosen = the preferred answer, rejected = the other, when their texts differ."""
    q = (select(PairwisePreference, PairwiseCase).join(PairwiseCase, PairwiseCase.id == PairwisePreference.case_id)
         .where(PairwiseCase.erased_at.is_(None), _effective()))
    if batch is not None:
        q = q.where(PairwiseCase.batch == batch)
    if corrections_only:
        q = q.where(PairwisePreference.correction.is_not(None))
    out = []
    for pref, case in s.execute(q.order_by(PairwisePreference.id)).all():
        answers = {Winner.candidate: (case.candidate_answer, case.candidate_version_id),
                   Winner.active: (case.active_answer, case.active_version_id)}
        base = dict(case_id=case.id, preference_id=pref.id, turn_id=case.turn_id, image_hashes=list(case.image_hashes),
                    question=case.question, context=dict(case.context or {}), template=case.template,
                    created=as_utc(pref.created_at))
        if pref.correction is not None:
            for text, vid in answers.values():
                if text.strip() != pref.correction.strip():
                    out.append(PairwisePreferencePair(**base, chosen=pref.correction, rejected=text, source="correction",
                                                      chosen_version_id=None, rejected_version_id=vid))
        elif pref.winner is not Winner.tie:
            loser = Winner.active if pref.winner is Winner.candidate else Winner.candidate
            (chosen, cid), (rejected, rid) = answers[pref.winner], answers[loser]
            if chosen.strip() != rejected.strip():
                out.append(PairwisePreferencePair(**base, chosen=chosen, rejected=rejected, source="preference",
                                                  chosen_version_id=cid, rejected_version_id=rid))
    return out


def erase_cases(s: Session, turn_ids: Sequence[int], deleted_hashes: Sequence[str], when: datetime) -> list[int]:
    """Blank the pairwise cases of erased turns, and the held-out cases showing an image that is gone
    (called by `erase.erase` in its transaction). Their preferences lose correction and comment.
    Returns the ids of those preferences (lineage: the versions trained on them)."""
    ids: set[int] = set()
    for i in range(0, len(turn_ids), 500):
        ids.update(s.scalars(select(PairwiseCase.id).where(PairwiseCase.turn_id.in_(turn_ids[i:i + 500]))))
    if deleted_hashes:
        gone = set(deleted_hashes)
        ids.update(cid for cid, hashes in s.execute(select(PairwiseCase.id, PairwiseCase.image_hashes)
                                                     .where(PairwiseCase.erased_at.is_(None)))
                   if gone & set(hashes or ()))
    for case in s.scalars(select(PairwiseCase).where(PairwiseCase.id.in_(sorted(ids)))) if ids else ():
        case.question, case.context, case.image_hashes = "", {}, []
        case.candidate_answer = case.active_answer = ""
        case.erased_at = case.erased_at or when
    prefs = list(s.scalars(select(PairwisePreference).where(PairwisePreference.case_id.in_(sorted(ids))))) if ids else []
    for pref in prefs:
        pref.correction = pref.comment = None
    s.flush()
    return sorted(p.id for p in prefs)
