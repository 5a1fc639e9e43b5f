"""The annotation store's tables (SQLAlchemy 2.0 typed models).

This module is the head of the schema; the Alembic revisions in `migrations/`
build the same thing step by step (a test checks that they agree). Conventions:
typed `Mapped[...]` columns, a timestamp mixin, constraint names from the naming
convention, foreign keys with `ondelete` and an index, non-native enums (a
VARCHAR plus a named CHECK) so SQLite and PostgreSQL behave alike.

What may never be lost is protected by `ondelete="RESTRICT"`: a user, turn or
image that ratings or lineage point at cannot be deleted from under them. The one
sanctioned removal of content is an erasure (`erase.py`): the rows stay, their
text and image links go, and an `Erasure` tombstone says who, when and why.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Role(str, enum.Enum):
    clinician = "clinician"
    expert = "expert"
    admin = "admin"


ROLES = tuple(r.value for r in Role)  # the one list of roles: the store, the app and refine use it
RATER_ROLES = (Role.expert.value, Role.admin.value)  # whose full ratings are expert reviews (admins review as experts)


class TurnStatus(str, enum.Enum):
    complete = "complete"
    stopped = "stopped"
    error = "error"


class RatingKind(str, enum.Enum):
    full = "full"  # an expert's review: score, correction, label, flags
    thumbs = "thumbs"  # a quick thumbs up (5) / down (1), from anyone


class Flag(str, enum.Enum):
    hallucination = "hallucination"
    unsafe = "unsafe"
    incomplete = "incomplete"
    wrong_diagnosis = "wrong_diagnosis"


class VersionStatus(str, enum.Enum):
    candidate = "candidate"
    active = "active"
    rejected = "rejected"
    retired = "retired"


class RunStatus(str, enum.Enum):
    running = "running"
    completed = "completed"  # trained and evaluated (promoted or not: see the version)
    failed = "failed"
    skipped = "skipped"  # too few new gold pairs


class Choice(str, enum.Enum):
    """What a rater clicked in blind pairwise review (A and B as shown to them)."""

    a = "a"
    b = "b"
    tie = "tie"


class Side(str, enum.Enum):
    """Which version's answer a rater saw as A."""

    candidate = "candidate"
    active = "active"


class Winner(str, enum.Enum):
    """A pairwise choice mapped back to the versions."""

    candidate = "candidate"
    active = "active"
    tie = "tie"


class Split(str, enum.Enum):
    train = "train"
    heldout = "heldout"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
    )


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.current_timestamp()
    )


class User(TimestampMixin, Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[Role] = mapped_column(_enum(Role, "role"), default=Role.expert)


class Image(TimestampMixin, Base):
    """An image, stored once, keyed by the SHA-256 of its normalised pixels. Never a file name."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("sha256"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int]
    height: Mapped[int]
    format: Mapped[str] = mapped_column(String(16), default="PNG")
    nbytes: Mapped[int | None]


class Conversation(TimestampMixin, Base):
    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    context: Mapped[dict[str, Any]] = mapped_column(default=dict)  # age, sex, site, duration...
    # Set by an erasure (the tombstone is in `erasures`): every read for people, exports and training skips it.
    erased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    user: Mapped[User] = relationship()
    turns: Mapped[list[Turn]] = relationship(back_populates="conversation", order_by="Turn.seq")


class Turn(TimestampMixin, Base):
    __tablename__ = "turns"
    __table_args__ = (
        UniqueConstraint("conversation_id", "seq"),
        UniqueConstraint("regenerates_id"),  # one regeneration per answer: a chain, never two live answers
        Index("ix_turns_queue", "expert_raters", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="RESTRICT"), index=True
    )
    seq: Mapped[int]  # 0, 1, 2... within the conversation
    question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    template: Mapped[str] = mapped_column(String(200))
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL"), index=True
    )
    status: Mapped[TurnStatus] = mapped_column(_enum(TurnStatus, "status"), default=TurnStatus.complete)
    latency_s: Mapped[float | None] = mapped_column(Float)
    ttft_s: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    # Distinct experts with a full rating: kept by add_rating so the review queue is an index scan.
    expert_raters: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # The answer this one regenerates (same question and images, asked again): that row stays as it was
    # (its ratings too) and is left out of the conversation's history from now on.
    regenerates_id: Mapped[int | None] = mapped_column(ForeignKey("turns.id", ondelete="RESTRICT"))

    conversation: Mapped[Conversation] = relationship(back_populates="turns")
    model_version: Mapped[ModelVersion | None] = relationship()


class ConversationImage(Base):
    """An image of a conversation and the turn it was given in."""

    __tablename__ = "conversation_images"
    __table_args__ = (UniqueConstraint("turn_id", "position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    turn_id: Mapped[int] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="RESTRICT"), index=True)
    position: Mapped[int]  # order within the turn

    image: Mapped[Image] = relationship()


class Rating(TimestampMixin, Base):
    """Append-only: re-rating adds a row; the latest per (turn, rater) is the effective one."""

    __tablename__ = "ratings"
    __table_args__ = (
        CheckConstraint("score >= 1 AND score <= 5", name="score_range"),
        CheckConstraint("kind IN ('full', 'thumbs')", name="kind"),
        Index("ix_ratings_turn_rater", "turn_id", "rater_id", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # indexed by ix_ratings_turn_rater (turn_id first)
    turn_id: Mapped[int] = mapped_column(ForeignKey("turns.id", ondelete="RESTRICT"))
    rater_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    # Which model version produced the rated answer (a copy of the turn's, kept with the vote).
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL"), index=True
    )
    score: Mapped[int]
    correction: Mapped[str | None] = mapped_column(Text)
    diagnosis: Mapped[str | None] = mapped_column(String(200))
    flags: Mapped[list[Any]] = mapped_column(default=list)
    comment: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[RatingKind] = mapped_column(
        Enum(RatingKind, native_enum=False, create_constraint=False, length=8,
             values_callable=lambda e: [m.value for m in e]),
        default=RatingKind.full,
        server_default=RatingKind.full.value,
    )

    turn: Mapped[Turn] = relationship()
    rater: Mapped[User] = relationship()


class ModelVersion(TimestampMixin, Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("name"),
        # Exactly one active version, enforced by the database on SQLite and PostgreSQL alike.
        Index(
            "uq_model_versions_one_active",
            "status",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(32))  # v1, v2...
    base_model: Mapped[str] = mapped_column(String(500))
    adapter_path: Mapped[str | None] = mapped_column(String(1000))  # None: the bare base
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL"), index=True
    )
    training_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("training_runs.id", ondelete="SET NULL"), index=True
    )
    status: Mapped[VersionStatus] = mapped_column(
        _enum(VersionStatus, "status"), default=VersionStatus.candidate
    )
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    note: Mapped[str | None] = mapped_column(Text)
    status_reason: Mapped[str | None] = mapped_column(Text)  # why promoted (forced) / rejected / retired
    status_changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    parent: Mapped[ModelVersion | None] = relationship(remote_side=[id])
    training_run: Mapped[TrainingRun | None] = relationship()


class TrainingRun(TimestampMixin, Base):
    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[RunStatus] = mapped_column(_enum(RunStatus, "status"), default=RunStatus.running)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    counts: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # pairs by source
    synthetic_ids: Mapped[list[Any] | None] = mapped_column(JSON)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class TrainingRunRating(Base):
    """Lineage: the ratings (corrections, accepted answers) that went into a run."""

    __tablename__ = "training_run_ratings"

    run_id: Mapped[int] = mapped_column(
        ForeignKey("training_runs.id", ondelete="CASCADE"), primary_key=True
    )
    rating_id: Mapped[int] = mapped_column(
        ForeignKey("ratings.id", ondelete="RESTRICT"), primary_key=True, index=True
    )


class TrainingRunPreference(Base):
    """Lineage: the experts' blind pairwise preferences that went into a (DPO) run."""

    __tablename__ = "training_run_preferences"

    run_id: Mapped[int] = mapped_column(
        ForeignKey("training_runs.id", ondelete="CASCADE"), primary_key=True
    )
    preference_id: Mapped[int] = mapped_column(
        ForeignKey("pairwise_preferences.id", ondelete="RESTRICT"), primary_key=True, index=True
    )


class EvalSplit(TimestampMixin, Base):
    """The frozen evaluation split: assigned once per image hash, never changed."""

    __tablename__ = "eval_split"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    split: Mapped[Split] = mapped_column(_enum(Split, "split"))


class Erasure(TimestampMixin, Base):
    """The tombstone of an erased conversation: who erased it, when (created_at) and why, what was
    removed (ids kept, so counts and lineage still add up) and which model versions learned from it."""

    __tablename__ = "erasures"
    __table_args__ = (UniqueConstraint("conversation_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="RESTRICT"))
    erased_by_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    reason: Mapped[str] = mapped_column(Text)
    turn_ids: Mapped[list[Any]] = mapped_column(default=list)  # their question and answer text removed
    rating_ids: Mapped[list[Any]] = mapped_column(default=list)  # their correction, label and comment removed
    images_unlinked: Mapped[int] = mapped_column(Integer, default=0)
    images_deleted: Mapped[int] = mapped_column(Integer, default=0)  # used by no other conversation: row and file gone
    trained_versions: Mapped[list[Any]] = mapped_column(default=list)  # version names that learned from it: retrain
    training_runs: Mapped[list[Any]] = mapped_column(default=list)  # run ids whose lineage holds its ratings

    erased_by: Mapped[User] = relationship()


class PairwiseCase(TimestampMixin, Base):
    """One case that two versions both answered, queued for blind pairwise review by experts.

    `candidate` is the challenger and `active` the reference (the active version when queued). The
    case keeps what was asked (images by hash, question, context, template) and both answers; which
    answer is shown as A is drawn per rater (`pairwise.shown_first`), never stored here. `batch` groups
    the cases queued together (a refine run's human gate, an on-demand comparison); (batch, key) is
    unique, so queueing the same cases again adds nothing."""

    __tablename__ = "pairwise_cases"
    __table_args__ = (
        UniqueConstraint("batch", "key"),
        CheckConstraint("candidate_version_id <> active_version_id", name="two_versions"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    batch: Mapped[str] = mapped_column(String(100))
    key: Mapped[str] = mapped_column(String(200))  # "turn:<id>", or a digest of images + question + context
    # The turn the case came from (None: a held-out or regression example); an erasure of its conversation blanks the case.
    turn_id: Mapped[int | None] = mapped_column(ForeignKey("turns.id", ondelete="RESTRICT"), index=True)
    image_hashes: Mapped[list[Any]] = mapped_column(default=list)
    question: Mapped[str] = mapped_column(Text)
    context: Mapped[dict[str, Any]] = mapped_column(default=dict)
    template: Mapped[str] = mapped_column(String(200), default="free")
    candidate_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="RESTRICT"), index=True)
    active_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="RESTRICT"), index=True)
    candidate_answer: Mapped[str] = mapped_column(Text)
    active_answer: Mapped[str] = mapped_column(Text)
    erased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # set by an erasure: skipped everywhere

    candidate_version: Mapped[ModelVersion] = relationship(foreign_keys=[candidate_version_id])
    active_version: Mapped[ModelVersion] = relationship(foreign_keys=[active_version_id])


class PairwisePreference(TimestampMixin, Base):
    """Append-only: a rater's blind judgement of a case (the latest per case and rater counts), with
    the order they saw and the choice mapped back to the versions."""

    __tablename__ = "pairwise_preferences"
    __table_args__ = (Index("ix_pairwise_preferences_case_rater", "case_id", "rater_id", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    # indexed by ix_pairwise_preferences_case_rater (case_id first)
    case_id: Mapped[int] = mapped_column(ForeignKey("pairwise_cases.id", ondelete="RESTRICT"))
    rater_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    shown_first: Mapped[Side] = mapped_column(_enum(Side, "shown_first"))  # the version shown as A
    choice: Mapped[Choice] = mapped_column(_enum(Choice, "choice"))  # as clicked: A better, B better, tie
    winner: Mapped[Winner] = mapped_column(_enum(Winner, "winner"))  # mapped back: candidate, active or tie
    preferred_version_id: Mapped[int | None] = mapped_column(  # None for a tie
        ForeignKey("model_versions.id", ondelete="RESTRICT"), index=True
    )
    correction: Mapped[str | None] = mapped_column(Text)  # the answer the expert would give (optional)
    comment: Mapped[str | None] = mapped_column(Text)

    case: Mapped[PairwiseCase] = relationship()
    rater: Mapped[User] = relationship()


class Lock(TimestampMixin, Base):
    """A named cross-process lock (the refine lock), with enough to detect a stale holder."""

    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int]
    host: Mapped[str] = mapped_column(String(255))
