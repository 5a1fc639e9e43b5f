"""The store API: plain functions taking a `Session` first.

What clinicians and experts produce goes in here and nothing is lost: turns keep
their question, answer, images, template, settings and model version; ratings are
append-only (re-rating adds a row; the latest row per turn and rater is the
effective one). Reads for the app (review queue, conversation history) and for
training (gold pairs) live here too; model versions, training runs, the eval split
and the refine lock are in `versions.py`, statistics in `stats.py`, erasure in `erase.py`, and all of them
are re-exported from here, so `from annotation_db import store` is all a caller needs.

Writes are not committed here: the caller's `Store.session()` / `session_scope()`
commits the whole unit or rolls it back, so no half-written row is ever kept.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import String, case, cast, func, select
from sqlalchemy.orm import Session, aliased

from ._util import as_utc, check_hash, check_hashes, check_int, check_json, check_text, dialect, write_lock
from .errors import Conflict, InvalidInput, NotFound
from .models import (
    RATER_ROLES,
    Conversation,
    ConversationImage,
    Flag,
    Image,
    ModelVersion,
    Rating,
    RatingKind,
    Role,
    Turn,
    TurnStatus,
    User,
)

# ---------------------------------------------------------------- users, images


EXPERT_ROLES = tuple(Role(r) for r in RATER_ROLES)  # whose full ratings count as expert reviews
MAX_CORRECTION_CHARS = 8000  # a corrected answer: several times the longest answer the model may give
MAX_COMMENT_CHARS = 4000


def get_or_create_user(s: Session, name: str, role: str | None = None) -> User:
    """The user called `name` with `role` (the app's auth config is the truth): created if
    new ("expert" when no role is given), and an existing user's role updated when it
    differs (left as it is when `role` is None). A role change recounts the expert reviews
    of the turns that user rated, in the same transaction."""
    name = check_text(name, "user name", max_len=200)
    try:
        role_ = None if role is None else Role(role)
    except ValueError:
        raise InvalidInput(f"unknown role {role!r}; use one of {[r.value for r in Role]}") from None
    user = s.scalar(select(User).where(User.name == name))
    if user is not None and (role_ is None or user.role is role_):
        return user
    write_lock(s)  # no two sessions create the same user (unique name) or interleave a recount
    user = s.scalar(select(User).where(User.name == name).execution_options(populate_existing=True))
    if user is None:
        user = User(name=name, role=role_ or Role.expert)
        s.add(user)
        s.flush()
    elif role_ is not None and user.role is not role_:
        was_expert = user.role in EXPERT_ROLES
        user.role = role_
        s.flush()
        if was_expert != (role_ in EXPERT_ROLES):
            rated = select(Rating.turn_id).where(Rating.rater_id == user.id, Rating.kind == RatingKind.full)
            recount_expert_raters(s, rated)
    return user


def recount_expert_raters(s: Session, turn_ids=None) -> int:
    """Recompute `turns.expert_raters` (distinct raters with a full rating whose role is in
    EXPERT_ROLES) for `turn_ids` (ids or a select of ids; None: every turn). Returns the
    number of turns whose counter changed. For databases written before admins counted."""
    q = select(Turn)
    if turn_ids is not None:
        q = q.where(Turn.id.in_(turn_ids))
    turns = list(s.scalars(q.with_for_update() if dialect(s) == "postgresql" else q))
    changed = 0
    for turn in turns:
        n = _count_expert_raters(s, turn.id)
        if turn.expert_raters != n:
            turn.expert_raters = n
            changed += 1
    s.flush()
    return changed


def _count_expert_raters(s: Session, turn_id: int) -> int:
    return s.scalar(
        select(func.count(func.distinct(Rating.rater_id)))
        .join(User, User.id == Rating.rater_id)
        .where(Rating.turn_id == turn_id, Rating.kind == RatingKind.full, User.role.in_(EXPERT_ROLES))
    )


def get_user(s: Session, user_id: int) -> User:
    user = s.get(User, user_id)
    if user is None:
        raise NotFound(f"no user with id {user_id}")
    return user


def record_image(s: Session, sha256: str, width: int, height: int, fmt: str = "PNG",
                 nbytes: int | None = None) -> Image:
    """Record an image by content hash (idempotent: the same hash returns the same row)."""
    sha256 = check_hash(sha256)
    image = s.scalar(select(Image).where(Image.sha256 == sha256))
    if image is not None:
        return image
    width = check_int(width, "image width", lo=1, hi=1_000_000)
    height = check_int(height, "image height", lo=1, hi=1_000_000)
    if nbytes is not None:
        nbytes = check_int(nbytes, "image size in bytes", lo=0, hi=2**31 - 1)
    fmt = check_text(fmt, "image format", max_len=16)
    image = Image(sha256=sha256, width=width, height=height, format=fmt, nbytes=nbytes)
    s.add(image)
    s.flush()
    return image


def known_image_hashes(s: Session, hashes: Iterable[str]) -> set[str]:
    """Which of `hashes` have an image row (the rest are files no turn refers to)."""
    hashes = list(hashes)
    known: set[str] = set()
    for i in range(0, len(hashes), 500):
        known.update(s.scalars(select(Image.sha256).where(Image.sha256.in_(hashes[i:i + 500]))))
    return known


# ---------------------------------------------------------- conversations, turns


def start_conversation(s: Session, user_id: int, context: dict | None = None) -> Conversation:
    """A new conversation by `user_id` with its clinical context (age, sex, site...)."""
    get_user(s, user_id)
    conv = Conversation(user_id=user_id, context=check_json(context, "clinical context"))
    s.add(conv)
    s.flush()
    return conv


def record_turn(
    s: Session,
    conversation_id: int,
    question: str,
    answer: str,
    *,
    image_hashes: Sequence[str] = (),
    template: str,
    settings: dict | None = None,
    model_version_id: int | None,
    status: str = "complete",
    latency_s: float | None = None,
    ttft_s: float | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    error: str | None = None,
    regenerates: int | None = None,
) -> Turn:
    """Record one question and answer; the images given in this turn are linked to it.

    `regenerates`: the id of the conversation's latest answer, asked again (same question, given the same
    images). That row is kept unchanged, with its ratings; the conversation's history leaves it out."""
    conv = s.get(Conversation, conversation_id)
    if conv is None:
        raise NotFound(f"no conversation with id {conversation_id}")
    question = check_text(question, "question")
    answer = check_text(answer, "answer", allow_blank=True)
    template = check_text(template, "prompt template", max_len=200)
    error = check_text(error, "error", required=False, allow_blank=True)
    try:
        status_ = TurnStatus(status)
    except ValueError:
        raise InvalidInput(f"unknown turn status {status!r}; use one of {[t.value for t in TurnStatus]}") from None
    for name, v in (("latency_s", latency_s), ("ttft_s", ttft_s)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
            raise InvalidInput(f"{name} must be a non-negative number of seconds, got {v!r}")
    for name, v in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens)):
        if v is not None:
            check_int(v, name, lo=0, hi=2**31 - 1)
    if model_version_id is not None and s.get(ModelVersion, model_version_id) is None:
        raise NotFound(f"no model version with id {model_version_id}")
    hashes = check_hashes(image_hashes)
    write_lock(s)  # two writers in one conversation must not both take the same seq; no erasure runs meanwhile
    if s.scalar(select(Conversation.erased_at).where(Conversation.id == conversation_id)) is not None:
        raise Conflict(f"conversation {conversation_id} was erased; start a new one")
    images = []
    for h in hashes:  # looked up under the lock: an erasure may have just removed an image row
        image = s.scalar(select(Image).where(Image.sha256 == h))
        if image is None:
            raise NotFound(f"image {h[:12]}… was never recorded (or was erased); call record_image first")
        images.append(image)
    seq = s.scalar(select(func.count()).select_from(Turn).where(Turn.conversation_id == conversation_id))
    if regenerates is not None:
        _check_regenerates(s, conversation_id, check_int(regenerates, "regenerated turn id", lo=1), seq)
    turn = Turn(
        conversation_id=conversation_id, seq=seq, question=question, answer=answer,
        template=template, settings=check_json(settings, "generation settings"),
        model_version_id=model_version_id, status=status_, latency_s=latency_s, ttft_s=ttft_s,
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, error=error, regenerates_id=regenerates,
    )
    s.add(turn)
    s.flush()
    for pos, image in enumerate(images):
        s.add(ConversationImage(conversation_id=conversation_id, turn_id=turn.id, image_id=image.id,
                                position=pos))
    s.flush()
    return turn


def _check_regenerates(s: Session, conversation_id: int, turn_id: int, seq: int) -> None:
    """Only the latest answer of the same conversation is regenerated (a later follow-up built on it)."""
    old = s.get(Turn, turn_id)
    if old is None or old.conversation_id != conversation_id:
        raise NotFound(f"no answer #{turn_id} in conversation {conversation_id}")
    if old.seq != seq - 1:
        raise Conflict(f"only the latest answer of a conversation can be regenerated; #{turn_id} has later turns")


def _superseded():
    """A condition on Turn: another turn regenerates it."""
    later = aliased(Turn)
    return select(later.id).where(later.regenerates_id == Turn.id).exists()


@dataclass(frozen=True)
class HistoryTurn:
    turn_id: int
    seq: int
    question: str
    answer: str
    image_hashes: list[str]  # the images given in this turn
    status: str
    model_version_id: int | None
    created: datetime
    regenerates_id: int | None = None  # the answer this one regenerates (left out of the history)


def _turn_images(s: Session, conversation_ids: Iterable[int]) -> dict[int, list[tuple[int, str]]]:
    """conversation id -> [(turn seq, image hash)] in the order they were given."""
    ids = list(set(conversation_ids))
    out: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for i in range(0, len(ids), 500):
        rows = s.execute(
            select(ConversationImage.conversation_id, Turn.seq, Image.sha256)
            .join(Turn, Turn.id == ConversationImage.turn_id)
            .join(Image, Image.id == ConversationImage.image_id)
            .where(ConversationImage.conversation_id.in_(ids[i:i + 500]))
            .order_by(Turn.seq, ConversationImage.position)
        )
        for cid, seq, sha in rows:
            out[cid].append((seq, sha))
    return out


def images_up_to(per_conv: list[tuple[int, str]], seq: int) -> list[str]:
    seen: dict[str, None] = {}
    for turn_seq, sha in per_conv:
        if turn_seq <= seq:
            seen.setdefault(sha, None)
    return list(seen)


def conversation_history(s: Session, conversation_id: int, *, regenerated: bool = False) -> list[HistoryTurn]:
    """The turns of a conversation, oldest first, each with the images given in it; the answers that were
    regenerated are left out (what the model and a reviewer should see) unless `regenerated`."""
    conv = s.get(Conversation, conversation_id)
    if conv is None:
        raise NotFound(f"no conversation with id {conversation_id}")
    if conv.erased_at is not None:
        raise NotFound(f"conversation {conversation_id} was erased")
    images = _turn_images(s, [conversation_id])[conversation_id]
    q = select(Turn).where(Turn.conversation_id == conversation_id)
    if not regenerated:
        q = q.where(~_superseded())
    turns = s.scalars(q.order_by(Turn.seq))
    return [
        HistoryTurn(
            turn_id=t.id, seq=t.seq, question=t.question, answer=t.answer,
            image_hashes=[sha for seq, sha in images if seq == t.seq], status=t.status.value,
            model_version_id=t.model_version_id, created=as_utc(t.created_at), regenerates_id=t.regenerates_id,
        )
        for t in turns
    ]


# ----------------------------------------------------------------------- ratings


def add_rating(
    s: Session,
    turn_id: int,
    rater_id: int,
    score: int,
    *,
    correction: str | None = None,
    diagnosis: str | None = None,
    flags: Iterable[str] = (),
    comment: str | None = None,
    kind: str = "full",
) -> Rating:
    """Append a rating. kind "full": an expert review; "thumbs": score 5 (up) or 1 (down)."""
    try:
        kind_ = RatingKind(kind)
    except ValueError:
        raise InvalidInput(f"unknown rating kind {kind!r}; use 'full' or 'thumbs'") from None
    score = check_int(score, "score", lo=1, hi=5)
    correction = check_text(correction, "correction", required=False, max_len=MAX_CORRECTION_CHARS)
    diagnosis = check_text(diagnosis, "diagnosis label", required=False, max_len=200)
    comment = check_text(comment, "comment", required=False, allow_blank=True, max_len=MAX_COMMENT_CHARS)
    if isinstance(flags, str):
        flags = [flags]
    allowed = {f.value for f in Flag}
    bad = [f for f in flags if f not in allowed]
    if bad:
        raise InvalidInput(f"unknown flag {bad[0]!r}; use any of {sorted(allowed)}")
    if kind_ is RatingKind.thumbs:
        if score not in (1, 5):
            raise InvalidInput("a thumbs rating has score 5 (up) or 1 (down)")
        if correction is not None or diagnosis is not None:
            raise InvalidInput("a thumbs rating carries no correction or diagnosis; use a full rating")
    q = select(Turn).where(Turn.id == turn_id)
    if dialect(s) == "postgresql":
        q = q.with_for_update()  # one writer per turn, so the expert count stays exact
    turn = s.scalar(q)
    if turn is None:
        raise NotFound(f"no turn with id {turn_id}")
    if turn.conversation.erased_at is not None:
        raise Conflict(f"answer #{turn_id} was erased and can no longer be rated")
    rater = get_user(s, rater_id)
    rating = Rating(
        turn_id=turn_id, rater_id=rater_id, model_version_id=turn.model_version_id, score=score,
        correction=correction, diagnosis=diagnosis, flags=sorted(set(flags)), comment=comment,
        kind=kind_,
    )
    s.add(rating)
    s.flush()
    if kind_ is RatingKind.full and rater.role in EXPERT_ROLES:
        turn.expert_raters = _count_expert_raters(s, turn_id)
        s.flush()
    return rating


def is_effective(rating: type[Rating] = Rating):
    """The one definition of an effective rating, as a SQL condition: no later rating of the same kind by
    the same rater on the same turn (ratings are append-only; the latest counts). One probe of the
    (turn_id, rater_id, id) index per rating."""
    later = aliased(Rating)
    return ~select(later.id).where(later.turn_id == rating.turn_id, later.rater_id == rating.rater_id,
                                   later.kind == rating.kind, later.id > rating.id).exists()


def effective_ratings(s: Session, turn_id: int, *, kind: str | None = "full") -> list[Rating]:
    """The latest rating of each rater on a turn (the ones that count)."""
    q = select(Rating).where(Rating.turn_id == turn_id, is_effective())
    if kind is not None:
        q = q.where(Rating.kind == RatingKind(kind))
    return list(s.scalars(q.order_by(Rating.id)))


# ------------------------------------------------------------------ review queue


@dataclass(frozen=True)
class ReviewItem:
    turn_id: int
    conversation_id: int
    question: str
    answer: str
    context: dict[str, Any]
    image_hashes: list[str]  # every image of the conversation up to this turn
    model_version: str | None  # name, e.g. "v3"
    model_version_id: int | None
    created: datetime
    seq: int = 0  # 0: the first question; later: a follow-up (earlier turns: conversation_history)


LOW_SCORE = 2  # an effective rating at or below this (a thumbs down is 1) puts a turn under "low score"


def _flagged():
    return select(Rating.id).where(Rating.turn_id == Turn.id, cast(Rating.flags, String) != "[]").exists()


def _low_score():
    return select(Rating.id).where(Rating.turn_id == Turn.id, Rating.score <= LOW_SCORE, is_effective()).exists()


def _queue_filter(q, rater_id: int, need: int, model_version_id: int | None, *, include_own: bool = False,
                  flagged: bool = False, low_score: bool = False):
    own = select(Rating.id).where(Rating.turn_id == Turn.id, Rating.rater_id == rater_id)
    q = q.where(
        Turn.expert_raters.in_(range(need)),  # an IN list keeps the (expert_raters, id) index usable
        Turn.status != TurnStatus.error,
        Conversation.erased_at.is_(None),
        ~own.exists(),
    )
    if not include_own:
        q = q.where(Conversation.user_id != rater_id)
    if model_version_id is not None:
        q = q.where(Turn.model_version_id == model_version_id)
    if flagged:
        q = q.where(_flagged())
    if low_score:
        q = q.where(_low_score())
    return q


def review_queue(s: Session, rater_id: int, *, need: int = 1, model_version_id: int | None = None,
                 limit: int = 1, offset: int = 0, include_own: bool = False, flagged: bool = False,
                 low_score: bool = False) -> list[ReviewItem]:
    """Turns with fewer than `need` expert reviews, oldest first, that `rater_id` did not
    ask (unless `include_own`: one person trying the whole loop) and has not rated yet
    (thumbs included); optionally only one version's, flagged ones, or low-scored ones."""
    check_int(need, "need", lo=1, hi=1000)
    check_int(limit, "limit", lo=0, hi=10_000)
    check_int(offset, "offset", lo=0)
    q = (
        select(Turn.id, Turn.conversation_id, Turn.seq, Turn.question, Turn.answer,
               Conversation.context, ModelVersion.name, Turn.model_version_id, Turn.created_at)
        .join(Conversation, Conversation.id == Turn.conversation_id)
        .outerjoin(ModelVersion, ModelVersion.id == Turn.model_version_id)
    )
    filters = dict(include_own=include_own, flagged=flagged, low_score=low_score)
    rows = s.execute(
        _queue_filter(q, rater_id, need, model_version_id, **filters).order_by(Turn.id).limit(limit).offset(offset)
    ).all()
    images = _turn_images(s, [r.conversation_id for r in rows])
    return [
        ReviewItem(
            turn_id=r.id, conversation_id=r.conversation_id, question=r.question, answer=r.answer,
            context=r.context or {}, image_hashes=images_up_to(images[r.conversation_id], r.seq),
            model_version=r.name, model_version_id=r.model_version_id, created=as_utc(r.created_at), seq=r.seq,
        )
        for r in rows
    ]


def review_queue_count(s: Session, rater_id: int, *, need: int = 1, model_version_id: int | None = None,
                       include_own: bool = False, flagged: bool = False, low_score: bool = False) -> int:
    q = select(func.count()).select_from(Turn).join(Conversation, Conversation.id == Turn.conversation_id)
    return s.scalar(_queue_filter(q, rater_id, need, model_version_id, include_own=include_own, flagged=flagged,
                                  low_score=low_score))


@dataclass(frozen=True)
class QueueCounts:
    total: int
    flagged: int
    low_score: int
    by_version: dict[str, int]  # version name ("(none)" for none) -> answers waiting


def review_queue_counts(s: Session, rater_id: int, *, need: int = 1, include_own: bool = False) -> QueueCounts:
    """How many answers wait for `rater_id` in all, flagged, low-scored and per model version (one query)."""
    q = (select(ModelVersion.name, func.count(), func.sum(case((_flagged(), 1), else_=0)),
                func.sum(case((_low_score(), 1), else_=0)))
         .select_from(Turn).join(Conversation, Conversation.id == Turn.conversation_id)
         .outerjoin(ModelVersion, ModelVersion.id == Turn.model_version_id))
    rows = s.execute(_queue_filter(q, rater_id, need, None, include_own=include_own)
                     .group_by(ModelVersion.id, ModelVersion.name).order_by(ModelVersion.id)).all()
    return QueueCounts(sum(r[1] for r in rows), int(sum(r[2] or 0 for r in rows)), int(sum(r[3] or 0 for r in rows)),
                       {(r[0] or "(none)"): r[1] for r in rows})


from .erase import Erased, erase, list_erasures  # noqa: E402,F401  re-exported
from .gold import GoldConflict, GoldPair, GoldResult, PreferencePair, gold_pairs  # noqa: E402,F401  re-exported
from .stats import agreement, stats_by_version, stats_over_time  # noqa: E402,F401  re-exported
from .versions import (  # noqa: E402,F401  re-exported
    acquire_lock,
    active_version,
    assign_split,
    ensure_base_version,
    finish_training_run,
    get_split,
    get_version,
    lineage,
    list_versions,
    promote,
    register_version,
    reject,
    release_lock,
    retire,
    rollback,
    start_training_run,
)
