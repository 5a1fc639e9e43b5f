"""Review: experts rate answers to others' questions from the store's queue, one at a time.

`Review(ctx).load`, `.save` (rate, then show the next), `.skip` and `.filter` (all,
flagged, low score; one model version). The queue holds turns that still need expert
reviews (`DemoOptions.review_need`) and that this expert has not rated, by other
users unless `Settings.review_own_answers` lets one person try the whole loop; a
follow-up is shown with the conversation that led to it (earlier questions, answers
and the images given at each turn); blind mode hides the model version. Clinicians
are refused here, server-side, whatever the page shows. The keyboard path (1-5,
Enter, S, E) is page script: `demo.keys`.
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
SHOW = ("all", "flagged", "low")  # the queue filters (the radio's values)
KEYS_LEGEND = ("⌨️ **Keyboard:** <kbd>1</kbd>-<kbd>5</kbd> score · <kbd>Enter</kbd> save & next · <kbd>S</kbd> skip · "
               "<kbd>E</kbd> edit the correction · <kbd>Esc</kbd> leave a text field (keys do nothing while you type)")


@dataclass
class ReviewState:
    turn_id: int | None = None
    answer: str = ""
    skipped: set[int] = field(default_factory=set)
    owner: str | None = None  # the signed-in user this page belongs to (demo.common.bind)
    show: str = "all"  # all | flagged | low
    version: str = ""  # a model version name, or "" for every version


def describe_context(context: dict) -> str:
    if not context:
        return "_No clinical context given._"
    ctx = ClinicalContext.from_dict(context).to_dict()
    return "\n".join(f"- **{CONTEXT_LABELS.get(k, k)}:** {plain(str(v))}" for k, v in ctx.items())


def describe_history(history: list, seq: int) -> str:
    """The turns before `seq`, as Markdown (people's text shown as typed; answers rendered safely)."""
    earlier = [t for t in history if t.seq < seq]
    if not earlier:
        return ""
    lines = [f"**A follow-up: the conversation that led to it ({len(earlier)} earlier turn{'s' if len(earlier) != 1 else ''})**"]
    for t in earlier:
        n = len(t.image_hashes)
        q = seq_label(t.seq, history)
        names = ", ".join(f"{q}.{i + 1}" for i in range(n))
        imgs = f" _(image{'s' if n != 1 else ''} {names})_" if n else ""
        lines.append(f"> **{q}:** {plain(t.question)}{imgs}\n>\n> **A{q[1:]}:** {model_markdown(t.answer) or '_(empty)_'}")
    return "\n\n".join(lines)


def seq_label(seq: int, history: list) -> str:
    """Q1, Q2... by place among the conversation's live turns (a regenerated answer's turn is not counted)."""
    return f"Q{sum(1 for t in history if t.seq < seq) + 1}"


class Review:
    def __init__(self, ctx: Ctx):
        self.ctx = ctx

    @property
    def _own(self) -> bool:
        return bool(getattr(self.ctx.settings, "review_own_answers", False))

    @staticmethod
    def _counter(left: int, state: ReviewState) -> str:
        skipped = len(state.skipped)
        scope = {"flagged": " (flagged)", "low": " (low score)"}.get(state.show, "") + (f" from {state.version}" if state.version else "")
        return (f"**{left}** answer{'s' if left != 1 else ''}{scope} left to review"
                + (f" ({skipped} skipped this session)" if skipped else ""))

    def _filters(self, s, rater_id: int, state: ReviewState) -> tuple[Any, Any, int]:
        """The filter controls with a count each, and the count for the current filter."""
        need = self.ctx.options.review_need
        c = st.review_queue_counts(s, rater_id, need=need, include_own=self._own)
        show = gr.update(choices=[(f"All ({c.total})", "all"), (f"Flagged ({c.flagged})", "flagged"),
                                  (f"Low score ({c.low_score})", "low")], value=state.show)
        versions = [(f"All versions ({c.total})", "")] + [(f"{n} ({k})", n) for n, k in c.by_version.items()]
        if state.version and state.version not in c.by_version:
            versions.append((f"{state.version} (0)", state.version))
        left = st.review_queue_count(s, rater_id, need=need, **self._query(s, state))
        return show, gr.update(choices=versions, value=state.version), left

    def _query(self, s, state: ReviewState) -> dict:
        vid = None
        if state.version:
            vid = next((v.id for v in st.list_versions(s) if v.name == state.version), -1)
        return dict(model_version_id=vid, include_own=self._own, flagged=state.show == "flagged",
                    low_score=state.show == "low")

    def _next(self, who: Identity, state: ReviewState, blind: bool, status: str = "") -> tuple:
        need = self.ctx.options.review_need
        with self.ctx.store.session() as s:
            rater = ensure_user(s, who)
            items = st.review_queue(s, rater.id, need=need, limit=len(state.skipped) + 1, **self._query(s, state))
            show, versions, left = self._filters(s, rater.id, state)
            item = next((i for i in items if i.turn_id not in state.skipped), None)
            history = st.conversation_history(s, item.conversation_id) if item is not None and item.seq > 0 else []
            own_waiting = (not self._own and item is None
                           and st.review_queue_count(s, rater.id, need=need, include_own=True) > left)
        counter = self._counter(left, state)
        if item is None:
            state.turn_id, state.answer = None, ""
            empty = "🎉 Nothing left to review." if left == 0 else "Only skipped answers are left; reload the page to see them again."
            if own_waiting:
                empty += (" Answers to your own questions are not shown here; to review them yourself (one person trying "
                          "the whole loop), start the app with `--review-own-answers` (DERMALOOP_REVIEW_OWN_ANSWERS=1).")
            return (state, counter, [], "", empty, "", "", None, "", "", [], "", "", show, versions, status)
        images, missing = self._images(item, history)
        state.turn_id, state.answer = item.turn_id, item.answer
        note = (f"\n\n⚠️ **{missing} of its {len(item.image_hashes)} image{'s' if len(item.image_hashes) != 1 else ''} "
                f"{'is' if missing == 1 else 'are'} missing from the data directory**; rate what you can, or skip."
                if missing else "")
        version = "_Model version hidden (blind review)._" if blind else f"Model version: **{item.model_version or 'unknown'}**"
        label = "Follow-up question" if any(t.seq < item.seq for t in history) else "Question"  # not a regenerated first answer
        return (
            state, counter, images, describe_context(item.context),
            f"**{label} (answer #{item.turn_id}, conversation #{item.conversation_id}):** {plain(item.question)}{note}",
            model_markdown(item.answer) or "_(empty answer)_", version, None, item.answer, "", [], "",
            describe_history(history, item.seq), show, versions, status,
        )

    def _images(self, item: Any, history: list) -> tuple[list, int]:
        """The conversation's images up to this turn, each captioned with the question it was given with."""
        given = {h: seq_label(t.seq, history) for t in reversed(history) for h in t.image_hashes}
        images, missing = [], 0
        counters: dict[str, int] = {}
        for h in item.image_hashes:  # a lost image file must not block the queue: show the rest, say so
            q = given.get(h, seq_label(item.seq, history))
            counters[q] = counters.get(q, 0) + 1
            try:
                images.append((load_stored(self.ctx.settings.images_dir, h), f"given with {q} ({q}.{counters[q]})"))
            except (ImageError, OSError, ValueError):
                log.warning("review of answer #%s: stored image %s… cannot be read", item.turn_id, h[:12])
                missing += 1
        return images, missing

    def open(self, state: ReviewState, blind: bool, request: gr.Request) -> tuple:
        """Opening the tab: keep the answer on screen (and the expert's edits), refresh the counts."""
        with user_errors():
            who = self.ctx.auth.require_rater(request)
            admit(self.ctx, who, request, state)
            if state.turn_id is None:
                return self._next(who, state, blind)
            with self.ctx.store.session() as s:
                show, versions, left = self._filters(s, ensure_user(s, who).id, state)
        return (state, self._counter(left, state), *[gr.update()] * 11, show, versions, gr.update())

    def load(self, state: ReviewState, blind: bool, request: gr.Request) -> tuple:
        """Show the next answer to review. Outputs: state, counter, images, context, question, answer,
        version, score, correction (pre-filled with the answer), diagnosis, flags, comment, earlier
        conversation, filter, version filter, status."""
        with user_errors():
            who = self.ctx.auth.require_rater(request)
            admit(self.ctx, who, request, state)
            return self._next(who, state, blind)

    def filter(self, state: ReviewState, blind: bool, show: str, version: str, request: gr.Request) -> tuple:
        """Change the queue filter (all / flagged / low score, and a model version), then show its first answer."""
        with user_errors():
            who = self.ctx.auth.require_rater(request)
            admit(self.ctx, who, request, state)
            state.show = show if show in SHOW else "all"
            state.version = version or ""
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
