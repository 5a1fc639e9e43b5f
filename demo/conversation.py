"""The named API `/conversation`: a conversation for its author, and for experts and admins.

    client.predict("12", api_name="/conversation")   # -> JSON text (docs/api.md)

Wired in `demo/app.py` `_api`; the rule of who may read lives in
`annotation_db.conversation.read_conversation`. Everyone else, and an erased
conversation, get a one-line error.
"""

from __future__ import annotations

import json
from typing import Any

import gradio as gr

from annotation_db.conversation import read_conversation
from demo.common import Ctx, admit, parse_id, user_errors


class Conversations:
    def __init__(self, ctx: Ctx):
        self.ctx = ctx

    def api_conversation(self, conversation_id: Any, request: gr.Request) -> str:
        """/conversation: (conversation id) -> the conversation as JSON (owner, context, turns with their images)."""
        with user_errors():
            who = self.ctx.auth.identify(request)
            admit(self.ctx, who, request)
            cid = parse_id(conversation_id, "conversation id")
            with self.ctx.store.session() as s:
                view = read_conversation(s, cid, reader=who.name, any_owner=who.can_rate)
        return json.dumps(view)
