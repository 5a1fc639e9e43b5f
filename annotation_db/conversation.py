"""Reading one conversation for a person: its owner, or an expert or admin.

    from annotation_db.conversation import read_conversation
    with store.session() as s:
        view = read_conversation(s, conversation_id, reader="cara", any_owner=False)

The app's named API `/conversation` calls this (docs/api.md). Who may read is decided
here, from the reader's name and whether their role reads every conversation, so the
app and scripts share one rule. A reader who may not see a conversation gets the same
message whether it exists or not (no probing of ids); an erased conversation is refused.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ._util import as_utc
from .errors import NotFound
from .models import Conversation, ModelVersion, User
from .store import conversation_history


def read_conversation(s: Session, conversation_id: int, *, reader: str, any_owner: bool) -> dict[str, Any]:
    """The conversation as plain data (JSON-ready): owner, context, created, and its turns, oldest first."""
    row = s.execute(select(Conversation, User.name).join(User, User.id == Conversation.user_id)
                    .where(Conversation.id == conversation_id)).first()
    if row is None or (not any_owner and row[1] != reader):
        if any_owner:
            raise NotFound(f"no conversation with id {conversation_id}")
        raise NotFound(f"conversation {conversation_id} is not one of yours (only its author, experts and admins may read it)")
    conv, owner = row
    if conv.erased_at is not None:
        raise NotFound(f"conversation {conversation_id} was erased and can no longer be read")
    turns = conversation_history(s, conversation_id)
    live = {t.turn_id for t in turns}
    regenerated = [t.turn_id for t in conversation_history(s, conversation_id, regenerated=True) if t.turn_id not in live]
    ids = {t.model_version_id for t in turns if t.model_version_id is not None}
    rows = s.execute(select(ModelVersion.id, ModelVersion.name).where(ModelVersion.id.in_(ids))).all() if ids else []
    names = {vid: name for vid, name in rows}
    return {
        "conversation_id": conv.id,
        "owner": owner,
        "created": as_utc(conv.created_at).isoformat(),
        "context": conv.context or {},
        "turns": [{"turn_id": t.turn_id, "seq": t.seq, "question": t.question, "answer": t.answer,
                   "model_version": names.get(t.model_version_id), "status": t.status,
                   "created": t.created.isoformat(), "image_hashes": t.image_hashes} for t in turns],
        "regenerated": regenerated,  # answers asked again (Regenerate): kept in the record, left out of "turns"
    }
