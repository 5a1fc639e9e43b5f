"""What every handler shares: the app context, errors at the edge, saving a rating.

Errors a person can fix (core's `DermaLoopError`, the store's `StoreError`, a
refused role) become `gr.Error` with their one-line message; nothing else is
caught, so a bug still shows as a bug.
"""

from __future__ import annotations

import contextlib
import html
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import gradio as gr

from annotation_db import store as st
from annotation_db.errors import StoreError
from core.errors import DermaLoopError, InputError
from demo.auth import AuthConfig, Denied, Identity
from demo.runtime import DemoOptions, Runtime
from demo.security import ExportLinks, UsageLimits

log = logging.getLogger("dermaloop.demo")

NOTICE = (
    "**Research use only.** DermaLoop is not a medical device and not a substitute for a clinician's "
    "judgement. Do not upload images that identify a patient."
)
FLAG_CHOICES = [
    ("Hallucination", "hallucination"),
    ("Unsafe advice", "unsafe"),
    ("Incomplete", "incomplete"),
    ("Wrong diagnosis", "wrong_diagnosis"),
]
FLAG_VALUES = [v for _, v in FLAG_CHOICES]
SCORE_CHOICES = [("1 · wrong or harmful", 1), ("2 · poor", 2), ("3 · acceptable", 3), ("4 · good", 4), ("5 · excellent", 5)]


@dataclass
class Ctx:
    """Everything a handler needs; built once by `build_demo`."""

    runtime: Runtime
    auth: AuthConfig
    options: DemoOptions
    links: ExportLinks = field(default_factory=ExportLinks)  # signed, expiring names for export downloads
    limits: UsageLimits = field(default_factory=UsageLimits)  # per-user calls, sessions and uploads

    @property
    def settings(self):
        return self.runtime.settings

    @property
    def store(self):
        return self.runtime.store


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn what a person can fix into a message in the page (and nothing stored)."""
    try:
        yield
    except (DermaLoopError, StoreError, Denied) as e:
        raise gr.Error(str(e), print_exception=False) from None


_MARKDOWN_ACTIVE = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>])")
_URL = re.compile(r"(https?://[^\s'\"<>&]+)")


def plain(text: str | None) -> str:
    """A person's text shown in Markdown as typed: no formatting, images or HTML take effect (a
    `![x](http://host/pixel.png)` in a question must not make the expert's browser fetch it).
    Bare URLs are left unescaped: the renderer links them as typed (a link loads nothing by itself),
    and a backslash inside one would show."""
    parts = _URL.split(html.escape(text or "", quote=False))
    return "".join(p if i % 2 else _MARKDOWN_ACTIVE.sub(r"\\\1", p) for i, p in enumerate(parts))


def model_markdown(text: str | None) -> str:
    """A model's answer as Markdown: lists and emphasis render, but no image loads and no HTML runs
    (an answer can echo what a question smuggled in)."""
    return html.escape(text or "", quote=False).replace("![", "!\\[")


def admit(ctx: Ctx, who: Identity, request: Any, state: Any = None) -> None:
    """Every handler a person triggers: within their limits, and (with a page state) on their own page."""
    ctx.limits.call(who.name, getattr(request, "session_hash", None))
    if state is not None:
        bind(state, who)


def bind(state: Any, who: Identity) -> None:
    """A page's state (a Case, a ReviewState) belongs to the user who first acted on it: an event sent
    with another user's session id (it travels in URLs) is refused, never served from their state."""
    if state.owner is None:
        state.owner = who.name
    elif state.owner != who.name:
        raise Denied("this page belongs to another signed-in user: reload the page")


def ensure_user(s, who: Identity):
    return st.get_or_create_user(s, who.name, who.role)


def parse_score(score: Any) -> int:
    if score in (None, ""):
        raise InputError("choose a score from 1 to 5")
    try:
        value = float(score)
    except (TypeError, ValueError):
        raise InputError(f"the score must be a number from 1 to 5, not {score!r}") from None
    if not math.isfinite(value) or value != int(value) or not 1 <= value <= 5:
        raise InputError(f"the score must be a whole number from 1 to 5, not {score!r}")
    return int(value)


def parse_id(value: Any, what: str) -> int:
    if value in (None, ""):
        raise InputError(f"the {what} is missing")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"the {what} must be a number, not {value!r}") from None
    if not math.isfinite(number) or number != int(number) or number < 1:
        raise InputError(f"the {what} must be a positive whole number, not {value!r}")
    return int(number)


def parse_flags(flags: Any) -> list[str]:
    """Flags from a form or the API: a list, or comma-separated text; the store names an unknown one."""
    if flags in (None, ""):
        return []
    if isinstance(flags, str):
        flags = flags.split(",")
    if not isinstance(flags, (list, tuple)):
        raise InputError(f"flags must be a list of names, not {flags!r}")
    return [str(f).strip() for f in flags if str(f).strip()]


def blank_to_none(text: str | None) -> str | None:
    return text.strip() if text and text.strip() else None


@dataclass(frozen=True)
class SavedRating:
    id: int
    turn_id: int
    score: int
    corrected: bool

    @property
    def message(self) -> str:
        extra = ", with your correction" if self.corrected else ""
        return f"✅ Rating #{self.id} saved for answer #{self.turn_id}: score {self.score}{extra}."


def save_rating(
    ctx: Ctx,
    who: Identity,
    turn_id: int,
    score: Any,
    *,
    correction: str | None = None,
    model_answer: str | None = None,
    diagnosis: str | None = None,
    flags: Iterable[str] = (),
    comment: str | None = None,
) -> SavedRating:
    """Append a full rating by `who` (a rater); a correction equal to the model's answer is no correction."""
    assert who.can_rate, "callers check the role first"
    score = parse_score(score)
    correction = blank_to_none(correction)
    if correction is not None and model_answer is not None and correction == model_answer.strip():
        correction = None  # the pre-filled answer, left as it was
    with ctx.store.session() as s:
        rater = ensure_user(s, who)
        rating = st.add_rating(s, turn_id, rater.id, score, correction=correction, diagnosis=blank_to_none(diagnosis),
                               flags=list(flags or ()), comment=blank_to_none(comment), kind="full")
        rating_id = rating.id
    log.info("rating %s by %s on turn %s (score %s%s)", rating_id, who.name, turn_id, score, ", corrected" if correction else "")
    return SavedRating(rating_id, turn_id, score, correction is not None)
