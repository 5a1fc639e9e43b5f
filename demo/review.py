"""Review: experts rate answers to others' questions from the store's queue, one at a time.

`Review(ctx).load`, `.save` (rate, then show the next) and `.skip`. The queue holds
turns by other users that still need expert reviews (`DemoOptions.review_need`) and
that this expert has not rated; blind mode hides the model version. Clinicians are
refused here, server-side, whatever the page shows.
"""

import logging
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from annotation_db import store as st
from core.images import ImageError, load_stored
from core.prompts import ClinicalContext
from demo.auth import Identity
from demo.common import Ctx, admit, ensure_user, model_markdown, plain, save_rating, user_errors

log = logging.getLogger("dermaloop.demo")

CONTEXT_LABELS = {"age": "Age", "sex": "Sex", "body_site": "Body site", "duration": "Duration", "symptoms": "Symptoms",
                  "fitzpatrick": "Fitzpatrick type", "modality": "Image type"}


@dataclass
class ReviewState:
    turn_id: int | None = None
    answer: str = ""
    skipped: set[int] = field(default_factory=set)
    owner: str | None = None  # the signed-in user this page belongs to (demo.common.bind)


def describe_context(context: dict) -> str:
    if not context:
        return "_No clinical context given._"
    ctx = ClinicalContext.from_dict(context).to_dict()
    return "\n".join(f"- **{CONTEXT_LABELS.get(k, k)}:** {plain(str(v))}" for k, v in ctx.items())


class Review:
    def __init__(self, ctx: Ctx):
        self.ctx = ctx

    @staticmethod
    def _counter(left: int, state: ReviewState) -> str:
        skipped = len(state.skipped)
        return f"**{left}** answer{'s' if left != 1 else ''} left to review" + (f" ({skipped} skipped this session)" if skipped else "")

    def _next(self, who: Identity, state: ReviewState, blind: bool, status: str = "") -> tuple:
        need = self.ctx.options.review_need
        with self.ctx.store.session() as s:
            rater = ensure_user(s, who)
            items = st.review_queue(s, rater.id, need=need, limit=len(state.skipped) + 1)
            left = st.review_queue_count(s, rater.id, need=need)
        item = next((i for i in items if i.turn_id not in state.skipped), None)
        counter = self._counter(left, state)
        if item is None:
            state.turn_id, state.answer = None, ""
            empty = "🎉 Nothing left to review." if left == 0 else "Only skipped answers are left; reload the page to see them again."
            return (state, counter, [], "", empty, "", "", None, "", "", [], "", status)
        images, missing = [], 0
        for h in item.image_hashes:  # a lost image file must not block the queue: show the rest, say so
            try:
                images.append(load_stored(self.ctx.settings.images_dir, h))
            except (ImageError, OSError, ValueError):
                log.warning("review of answer #%s: stored image %s… cannot be read", item.turn_id, h[:12])
                missing += 1
        state.turn_id, state.answer = item.turn_id, item.answer
        note = (f"\n\n⚠️ **{missing} of its {len(item.image_hashes)} image{'s' if len(item.image_hashes) != 1 else ''} "
                f"{'is' if missing == 1 else 'are'} missing from the data directory**; rate what you can, or skip."
                if missing else "")
        version = "_Model version hidden (blind review)._" if blind else f"Model version: **{item.model_version or 'unknown'}**"
        return (
            state, counter, images, describe_context(item.context), f"**Question (answer #{item.turn_id}):** {plain(item.question)}{note}",
            model_markdown(item.answer) or "_(empty answer)_", version, None, item.answer, "", [], "", status,
        )

    def open(self, state: ReviewState, blind: bool, request: gr.Request) -> tuple:
        """Opening the tab: keep the answer on screen (and the expert's edits), refresh the counter."""
        with user_errors():
            who = self.ctx.auth.require_rater(request)
            admit(self.ctx, who, request, state)
            if state.turn_id is None:
                return self._next(who, state, blind)
            with self.ctx.store.session() as s:
                left = st.review_queue_count(s, ensure_user(s, who).id, need=self.ctx.options.review_need)
        return (state, self._counter(left, state), *[gr.update()] * 11)

    def load(self, state: ReviewState, blind: bool, request: gr.Request) -> tuple:
        """Show the next answer to review. Outputs: state, counter, images, context, question, answer,
        version, score, correction (pre-filled with the answer), diagnosis, flags, comment, status."""
        with user_errors():
            who = self.ctx.auth.require_rater(request)
            admit(self.ctx, who, request, state)
            return self._next(who, state, blind)

    def save(self, state: ReviewState, blind: bool, score: Any, correction: str, diagnosis: str, flags: list,
             comment: str, request: gr.Request) -> tuple:
        with user_errors():
            who = self.ctx.auth.require_rater(request)
            admit(self.ctx, who, request, state)
            if state.turn_id is None:
                raise gr.Error("there is no answer on screen to rate")
            saved = save_rating(self.ctx, who, state.turn_id, score, correction=correction, model_answer=state.answer,
                                diagnosis=diagnosis, flags=flags, comment=comment)
            gr.Info(saved.message)
            return self._next(who, state, blind, saved.message)

    def skip(self, state: ReviewState, blind: bool, request: gr.Request) -> tuple:
        with user_errors():
            who = self.ctx.auth.require_rater(request)
            admit(self.ctx, who, request, state)
            if state.turn_id is not None:
                state.skipped.add(state.turn_id)
            return self._next(who, state, blind, "Skipped." if state.turn_id is not None else "")
