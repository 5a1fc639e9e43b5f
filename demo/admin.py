"""Admin: erase a conversation when a patient withdraws consent or a wrong image was uploaded.

`Admin(ctx).erase` (the page) and `.api_erase` (the named API `/erase`) call
`annotation_db.erase.erase_conversation`: one transaction removes the conversation's
text, images and rating content and leaves a tombstone (who, when, why, which model
versions were trained on it); the image files no other conversation uses are
deleted after the commit. Admins only, checked server-side.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import gradio as gr
import pandas as pd

from annotation_db import store as st
from annotation_db.erase import Erased, erase_conversation
from demo.common import Ctx, admit, ensure_user, parse_id, user_errors

log = logging.getLogger("dermaloop.demo")

TOMBSTONE_COLUMNS = ["erasure", "conversation", "erased by", "when (UTC)", "reason", "turns", "ratings",
                     "images deleted", "trained versions (retrain)"]


def tombstone_row(e: Erased) -> dict[str, Any]:
    return {"erasure": e.erasure_id, "conversation": e.conversation_id, "erased by": e.erased_by,
            "when (UTC)": e.created.strftime("%Y-%m-%d %H:%M"), "reason": e.reason, "turns": e.turns,
            "ratings": e.ratings, "images deleted": e.images_deleted,
            "trained versions (retrain)": ", ".join(e.trained_versions) or "none"}


class Admin:
    def __init__(self, ctx: Ctx):
        self.ctx = ctx

    def _erase(self, conversation_id: Any, reason: str, request: Any) -> Erased:
        who = self.ctx.auth.require_admin(request, "erase a conversation")
        admit(self.ctx, who, request)
        cid = parse_id(conversation_id, "conversation id")
        with self.ctx.store.session() as s:
            ensure_user(s, who)  # the tombstone names the admin: they must exist in the store
        done = erase_conversation(self.ctx.store, cid, by=who.name, reason=reason or "",
                                  images_dir=self.ctx.settings.images_dir)
        log.info("conversation %s erased by %s (%d turns, %d ratings, %d image files)", cid, who.name, done.turns,
                 done.ratings, done.files_deleted)
        return done

    def tombstones(self, request: gr.Request) -> pd.DataFrame:
        with user_errors():
            self.ctx.auth.require_admin(request, "see erasures")
            with self.ctx.store.session() as s:
                rows = [tombstone_row(e) for e in st.list_erasures(s)]
        return pd.DataFrame(rows, columns=TOMBSTONE_COLUMNS)

    def erase(self, conversation_id: Any, reason: str, confirm: bool, request: gr.Request) -> tuple:
        """The page: outputs (status, tombstones table)."""
        with user_errors():
            if not confirm:
                raise gr.Error("tick the box to confirm: an erasure cannot be undone", print_exception=False)
            done = self._erase(conversation_id, reason, request)
        gr.Info(f"conversation {done.conversation_id} erased")
        return f"✅ {done.message}", self.tombstones(request)

    def api_erase(self, conversation_id: Any, reason: str, request: gr.Request) -> str:
        """/erase: (conversation id, reason) -> the tombstone as JSON (who, when, why, counts, versions to retrain)."""
        with user_errors():
            done = self._erase(conversation_id, reason, request)
        row = tombstone_row(done)
        return json.dumps({"erasure_id": done.erasure_id, "conversation_id": done.conversation_id,
                           "erased_by": done.erased_by, "erased_at": done.created.isoformat(), "reason": done.reason,
                           "turns": done.turns, "ratings": done.ratings, "images_unlinked": done.images_unlinked,
                           "images_deleted": row["images deleted"], "trained_versions": done.trained_versions,
                           "training_runs": done.training_runs, "message": done.message})
