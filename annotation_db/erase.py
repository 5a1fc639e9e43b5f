"""Erasure: the one sanctioned removal of content (a patient withdraws consent, a wrong image).

    from annotation_db.erase import erase_conversation
    done = erase_conversation(store, conversation_id, by="admin-name", reason="consent withdrawn",
                              images_dir=home / "images")
    done.trained_versions        # ["v3", "v4"]: versions that learned from it, to retrain

    python -m annotation_db erase CONVERSATION_ID --by ADMIN --reason "consent withdrawn"

In one transaction: the conversation's clinical context, every turn's question,
answer and error text, and every rating's correction, diagnosis label and comment
are removed; the links to its images are removed, and an image row that no other
conversation uses is deleted. The rows themselves stay (ids, scores, flags, model
versions, lineage), so counts and `training_run_ratings` still add up, and an
`Erasure` tombstone records who, when, why, what was removed and which model
versions were trained on its ratings (and their descendants, which continued
those adapters). Reads for people, exports, statistics and `gold_pairs` skip erased
conversations. Copies queued for blind pairwise review (`pairwise.erase_cases`) are blanked
too. Image files are deleted only after the commit, so a failed
erasure leaves every file in place; a file is kept if its image was recorded
again meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from ._util import as_utc, check_int, check_text, write_lock
from .db import Store
from .errors import Conflict, InvalidInput, NotFound
from .models import (
    Conversation,
    ConversationImage,
    Erasure,
    Image,
    ModelVersion,
    Rating,
    Role,
    TrainingRunPreference,
    TrainingRunRating,
    Turn,
    User,
    utcnow,
)

MAX_REASON_CHARS = 2000


@dataclass(frozen=True)
class Erased:
    """What an erasure did (the tombstone, plus the image hashes whose files may now be deleted)."""

    erasure_id: int
    conversation_id: int
    erased_by: str
    reason: str
    created: datetime
    turns: int
    ratings: int
    images_unlinked: int
    images_deleted: int
    trained_versions: list[str]
    training_runs: list[int]
    deleted_hashes: tuple[str, ...] = ()  # image rows removed: their files go after the commit
    files_deleted: int = 0

    @property
    def message(self) -> str:
        retrain = (f" Model versions trained on it: {', '.join(self.trained_versions)}; retrain without it "
                   "(python -m training.refine --from-base) and retire them." if self.trained_versions
                   else " No model version was trained on it.")
        return (f"Conversation {self.conversation_id} erased: {self.turns} turn(s), {self.ratings} rating(s), "
                f"{self.images_unlinked} image link(s) ({self.images_deleted} image(s) used nowhere else deleted)."
                + retrain)


def trained_on(s: Session, rating_ids: list[int], preference_ids: list[int] = ()) -> tuple[list[int], list[str]]:
    """(training runs whose lineage holds any of `rating_ids` or `preference_ids`, the names of the
    versions those runs produced and of every descendant version, which continued their adapters),
    in id order."""
    runs: set[int] = set()
    for table, column, ids in ((TrainingRunRating, TrainingRunRating.rating_id, list(rating_ids)),
                               (TrainingRunPreference, TrainingRunPreference.preference_id, list(preference_ids))):
        for i in range(0, len(ids), 500):
            runs.update(s.scalars(select(table.run_id).where(column.in_(ids[i:i + 500]))))
    if not runs:
        return [], []
    versions = list(s.execute(select(ModelVersion.id, ModelVersion.name, ModelVersion.parent_id,
                                     ModelVersion.training_run_id)).all())
    tainted = {v.id for v in versions if v.training_run_id in runs}
    grew = True
    while grew:  # descendants: a version whose parent learned from it learned from it too
        more = {v.id for v in versions if v.parent_id in tainted and v.id not in tainted}
        tainted |= more
        grew = bool(more)
    return sorted(runs), [v.name for v in sorted(versions, key=lambda v: v.id) if v.id in tainted]


def erase(s: Session, conversation_id: int, by_user_id: int, reason: str) -> Erased:
    """Erase a conversation's content in this session's transaction (the caller commits); see the module."""
    check_int(conversation_id, "conversation id", lo=1)
    reason = check_text(reason, "reason for the erasure", max_len=MAX_REASON_CHARS).strip()
    admin = s.get(User, by_user_id)
    if admin is None:
        raise NotFound(f"no user with id {by_user_id}")
    if admin.role is not Role.admin:
        raise InvalidInput(f"{admin.name} is a {admin.role.value}: only an admin can erase a conversation")
    write_lock(s)  # no turn is added to it, and no other conversation links its images, while it goes
    conv = s.get(Conversation, conversation_id, populate_existing=True)
    if conv is None:
        raise NotFound(f"no conversation with id {conversation_id}")
    if conv.erased_at is not None:
        tomb = s.scalar(select(Erasure).where(Erasure.conversation_id == conversation_id))
        who = tomb.erased_by.name if tomb is not None else "an admin"
        raise Conflict(f"conversation {conversation_id} was already erased by {who} on {as_utc(conv.erased_at):%Y-%m-%d %H:%M} UTC")
    turn_ids = list(s.scalars(select(Turn.id).where(Turn.conversation_id == conversation_id).order_by(Turn.id)))
    rating_ids = list(s.scalars(select(Rating.id).where(Rating.turn_id.in_(turn_ids)).order_by(Rating.id))) if turn_ids else []
    image_ids = set(s.scalars(select(ConversationImage.image_id).where(ConversationImage.conversation_id == conversation_id)))
    links = s.scalar(select(func.count()).select_from(ConversationImage)
                     .where(ConversationImage.conversation_id == conversation_id))

    now = utcnow()
    conv.context, conv.erased_at = {}, now
    s.execute(update(Turn).where(Turn.conversation_id == conversation_id)
              .values(question="", answer="", error=None), execution_options={"synchronize_session": "fetch"})
    if rating_ids:
        s.execute(update(Rating).where(Rating.turn_id.in_(turn_ids))
                  .values(correction=None, diagnosis=None, comment=None), execution_options={"synchronize_session": "fetch"})
    s.execute(delete(ConversationImage).where(ConversationImage.conversation_id == conversation_id))
    still_used = set(s.scalars(select(ConversationImage.image_id).where(ConversationImage.image_id.in_(image_ids)))) if image_ids else set()
    gone = sorted(image_ids - still_used)
    hashes = tuple(s.scalars(select(Image.sha256).where(Image.id.in_(gone)))) if gone else ()
    if gone:
        s.execute(delete(Image).where(Image.id.in_(gone)))
    from .pairwise import erase_cases

    # the copies of its questions and images queued for pairwise review, and the judgements on them
    preference_ids = erase_cases(s, turn_ids, hashes, now)
    runs, versions = trained_on(s, rating_ids, preference_ids)
    tomb = Erasure(conversation_id=conversation_id, erased_by_id=admin.id, reason=reason, turn_ids=turn_ids,
                   rating_ids=rating_ids, images_unlinked=links, images_deleted=len(gone), trained_versions=versions,
                   training_runs=runs, created_at=now)
    s.add(tomb)
    s.flush()
    return Erased(tomb.id, conversation_id, admin.name, reason, now, len(turn_ids), len(rating_ids), links, len(gone),
                  versions, runs, hashes)


def list_erasures(s: Session) -> list[Erased]:
    """Every tombstone, newest first (no content: there is none left)."""
    rows = s.scalars(select(Erasure).order_by(Erasure.id.desc()))
    return [Erased(t.id, t.conversation_id, t.erased_by.name, t.reason, as_utc(t.created_at), len(t.turn_ids),
                   len(t.rating_ids), t.images_unlinked, t.images_deleted, list(t.trained_versions),
                   list(t.training_runs)) for t in rows]


def delete_image_files(store: Store, images_dir: Path | str, hashes: tuple[str, ...] | list[str]) -> int:
    """Delete the stored files of `hashes` that still have no image row (one recorded again since the
    erasure keeps its file). Layout `<images_dir>/<sha[:2]>/<sha>.png`, as `core.images` stores them."""
    from .store import known_image_hashes

    if not hashes:
        return 0
    with store.session() as s:
        keep = known_image_hashes(s, hashes)
    n = 0
    for sha in hashes:
        path = Path(images_dir) / sha[:2] / f"{sha}.png"
        if sha not in keep and path.is_file():
            path.unlink()
            n += 1
    return n


def erase_conversation(store: Store, conversation_id: int, *, by: str, reason: str,
                       images_dir: Path | str | None) -> Erased:
    """Erase (committed) as the admin called `by`, then delete the image files no conversation uses."""
    from dataclasses import replace

    with store.session() as s:
        admin = s.scalar(select(User).where(User.name == by))
        if admin is None:
            raise NotFound(f"no user called {by!r}")
        done = erase(s, conversation_id, admin.id, reason)
    files = delete_image_files(store, images_dir, done.deleted_hashes) if images_dir is not None else 0
    return replace(done, files_deleted=files)
