"""Consult: a clinician's images, context and question become a streamed, recorded answer.

Plain handlers (`Consult(ctx).ask`, `.regenerate`, `.stop`, `.new_case`, `.like`, `.rate`) and the two
named API endpoints (`.api_ask` = /ask, `.api_rate` = /rate). Each validates all of
its input before anything is stored; every turn is recorded with its images
(content hashes), context, answer, model version, settings and latency.
"""

import contextlib
import dataclasses
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
from PIL import Image as PILImage

from annotation_db import store as st
from annotation_db.errors import NotFound
from core.errors import DermaLoopError, InputError
from core.images import StoredImage, image_path, intake_many, load_stored
from core.prompts import TEMPLATES, ChatTurn, ClinicalContext, check_question
from core.quality import quality_hints
from demo import EXAMPLES_DIR
from demo.auth import Denied, Identity
from demo.common import Ctx, admit, ensure_user, model_markdown, parse_flags, parse_id, parse_score, plain, save_rating, user_errors
from demo.security import is_example_copy

log = logging.getLogger("dermaloop.demo")


@dataclass
class PastTurn:
    question: str
    answer: str
    image_hashes: list[str]
    template: str


@dataclass
class Case:
    """One consultation in one browser tab (a gr.State): the conversation so far."""

    conversation_id: int | None = None
    context: dict = field(default_factory=dict)
    turns: list[PastTurn] = field(default_factory=list)
    image_hashes: list[str] = field(default_factory=list)  # every image given so far
    messages: list[dict] = field(default_factory=list)  # what the chat view shows
    turn_ids: dict[int, int] = field(default_factory=dict)  # chat message index -> turn id
    last_turn_id: int | None = None
    last_answer: str = ""
    owner: str | None = None  # the signed-in user this page belongs to (demo.common.bind)
    cache_key: str | None = None  # the engine's key for this case's cached keys/values (set at the first question:
    # gr.State copies its initial Case into every session, so a default made here would be shared)


@dataclass(frozen=True)
class Redo:
    """The latest answer, asked again (Regenerate): its question, template and images, and its turn id."""

    turn_id: int
    question: str
    template: str
    image_hashes: list[str]


@dataclass(frozen=True)
class Recorded:
    conversation_id: int
    turn_id: int
    version: str
    status: str


def footer(version: str, latency_s: float, status: str, when: datetime | None = None) -> str:
    parts = [f"model {version}", f"{latency_s:.1f} s"]
    if when is not None:
        parts.append(when.strftime("%Y-%m-%d %H:%M UTC"))
    if status != "complete":
        parts.append(f"**{status}**")
    return "\n\n— _" + " · ".join(parts) + "_"


CONTEXT_FIELDS = ("age", "sex", "body_site", "duration", "symptoms", "fitzpatrick", "modality")  # the form's context inputs


def context_from_form(form: dict[str, Any]) -> ClinicalContext:
    return ClinicalContext.from_dict({k: form.get(k) for k in CONTEXT_FIELDS})


def context_from_json(text: str | None) -> ClinicalContext:
    if text is None or not str(text).strip():
        return ClinicalContext()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"the context is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(data, dict):
        raise InputError('the context must be a JSON object, e.g. {"age": 54, "body_site": "back"}')
    return ClinicalContext.from_dict(data)


def upload_folder() -> str:
    from gradio.utils import get_upload_folder

    return get_upload_folder()


def clean_folder() -> Path:
    """Where the clean copies of page uploads lie (content-addressed, like the image store)."""
    return Path(upload_folder()) / "dermaloop-clean"


def upload_size(path: Any) -> int:
    try:
        return os.path.getsize(path)
    except (OSError, TypeError):
        return 0


def remove_upload(path: Any) -> None:
    """Delete an original upload (and the folder Gradio made for it) if it lies in the upload folder
    and is not one of our cleaned copies."""
    if not isinstance(path, (str, os.PathLike)):
        return
    root, p = Path(upload_folder()).resolve(), Path(path).resolve()
    if root not in p.parents or clean_folder().resolve() in p.parents or is_example_copy(p):
        return
    p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        p.parent.rmdir()  # only when empty


def file_paths(files: Any) -> list[Any]:
    """gr.File values (paths, dicts or FileData) as what core's intake accepts."""
    if files is None:
        return []
    if not isinstance(files, (list, tuple)):
        files = [files]
    out = []
    for f in files:
        if isinstance(f, dict):
            f = f.get("path") or f.get("name")
        elif hasattr(f, "path"):
            f = f.path
        if f:
            out.append(f)
    return out


class Consult:
    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self._running: dict[tuple[str, str], Any] = {}  # (user, session) -> the Generation streaming (for Stop)

    # -- shared by the page and the API ------------------------------------------
    def clean_uploads(self, files: Any, request: gr.Request) -> list[str] | None:
        """On upload: each file is replaced at once by its normalised pixels (no EXIF, GPS or other
        metadata) under a neutral name (`<sha256>.png`, stored as the image store stores, in Gradio's
        upload folder), and the original, kept by Gradio under the name it had on the clinician's disk,
        is deleted."""
        paths = file_paths(files)
        try:
            who = self.ctx.auth.identify(request)
            admit(self.ctx, who, request)
            self.ctx.limits.upload(who.name, [upload_size(p) for p in paths])
            stored = self._intake(paths, clean_folder())
            self.ctx.runtime.prepare([img.image for img in stored])  # encoded while the clinician types the question
            return [str(img.path) for img in stored]
        except (DermaLoopError, Denied, OSError) as e:
            gr.Warning(f"the upload could not be read ({e})" if isinstance(e, OSError) else str(e))
            return None
        finally:
            for path in paths:
                remove_upload(path)

    def preview(self, files: Any) -> tuple[list[str], str]:
        """On a change of the uploads: thumbnails, and gentle quality hints (too dark, blurred, too small)
        before the question is asked. The drawn example phantoms are smooth by design: no hint for them."""
        paths = file_paths(files)
        notes = []
        for n, path in enumerate(paths, 1):
            if is_example_copy(Path(path)) or EXAMPLES_DIR in Path(path).resolve().parents:
                continue
            try:
                with PILImage.open(path) as im:
                    hints = quality_hints(im)
            except (OSError, ValueError):
                continue  # the upload handler says what is wrong with a file
            notes += [f"- Image {n}: {h}" for h in hints]
        text = ("💡 **Before you ask** (hints, not rules):\n" + "\n".join(notes)) if notes else ""
        return [str(p) for p in paths], text

    def _intake(self, files: Any, into: Path | None = None) -> list[StoredImage]:
        s = self.ctx.settings
        return intake_many(file_paths(files), into or s.images_dir, max_images=s.max_images, max_pixels=s.max_pixels,
                           max_bytes=s.max_upload_bytes)

    def _history(self, turns: list[PastTurn], context: ClinicalContext) -> list[ChatTurn]:
        images_dir = self.ctx.settings.images_dir
        return [
            ChatTurn(t.question, t.answer, [load_stored(images_dir, h) for h in t.image_hashes],
                     context if i == 0 else None, t.template)
            for i, t in enumerate(turns)
        ]

    def _record(self, who: Identity, conversation_id: int | None, context: ClinicalContext, question: str,
                images: list[StoredImage], answer, error: str | None = None, redo: Redo | None = None) -> Recorded:
        version_id = self.ctx.runtime.version_id(answer.version)
        with self.ctx.store.session() as s:
            user = ensure_user(s, who)
            if conversation_id is None:
                conversation_id = st.start_conversation(s, user.id, context.to_dict()).id
            for img in images:
                st.record_image(s, img.sha256, img.width, img.height, "PNG", img.nbytes)
            turn = st.record_turn(
                s, conversation_id, question, answer.text, image_hashes=[i.sha256 for i in images],
                template=answer.template, settings=answer.generation, model_version_id=version_id,
                status="error" if error else answer.status, latency_s=answer.latency_s, ttft_s=answer.ttft_s,
                prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens, error=error,
                regenerates=redo.turn_id if redo else None,
            )
            turn_id = turn.id
        log.info("turn %s (conversation %s) by %s: %s, %s, %.1f s", turn_id, conversation_id, who.name,
                 answer.version, answer.status, answer.latency_s)
        return Recorded(conversation_id, turn_id, answer.version, "error" if error else answer.status)

    def _new_images(self, stored: list[StoredImage], known: list[str]) -> list[StoredImage]:
        seen, out = set(known), []
        for img in stored:
            if img.sha256 not in seen:
                seen.add(img.sha256)
                out.append(img)
        return out

    # -- the page -----------------------------------------------------------------
    def ask(self, form: dict[str, Any], request: gr.Request) -> Iterator[tuple]:
        """Stream an answer into the chat; yields (messages, case, question box, correction box, rating status).

        `form` holds the tab's inputs by name: case, files, question, template and CONTEXT_FIELDS; and "redo"
        (a Redo) when `regenerate` asks the latest answer again."""
        case, files, question, template = form["case"], form.get("files"), form.get("question"), form.get("template")
        redo: Redo | None = form.get("redo")
        with user_errors():
            who = self.ctx.auth.identify(request)
            admit(self.ctx, who, request, case)
            question = check_question(question, self.ctx.settings.max_question_chars)
            template = template or "free"
            if template not in TEMPLATES:
                raise InputError(f"unknown template {template!r}")
            if case.conversation_id is None:
                context = context_from_form(form)
            else:
                context = ClinicalContext.from_dict(case.context)
            given = file_paths(files) if redo is None else [image_path(self.ctx.settings.images_dir, h) for h in redo.image_hashes]
            stored = self._intake(given)
            shown_at = {img.sha256: str(path) for img, path in zip(stored, given)} if redo is None else {}  # the served copy of each
            images = self._new_images(stored, case.image_hashes)
            if len(images) > self.ctx.settings.max_images:
                raise InputError(f"{len(images)} images given; at most {self.ctx.settings.max_images} per question")
            history = self._history(case.turns, context)
            self.ctx.runtime.sync()
            case.cache_key = case.cache_key or f"case-{uuid.uuid4().hex}"
            generation = self.ctx.settings.generation()
            if redo is not None:  # greedy decoding would give the same answer again
                generation = dataclasses.replace(generation, do_sample=True)
            gen = self.ctx.runtime.stream([i.image for i in images], question, context=None if case.turns else context,
                                          history=history, template=template, generation=generation,
                                          conversation=case.cache_key)
        key = self._key(who, request)
        self._running[key] = gen
        # The images at the turn they were given (Gradio's multimodal chat messages: a file path per message).
        pictures = [{"role": "user", "content": {"path": shown_at[i.sha256], "alt_text": f"image {n + 1} of this question"}}
                    for n, i in enumerate(images) if i.sha256 in shown_at]
        messages = case.messages + pictures + [{"role": "user", "content": plain(question)}, {"role": "assistant", "content": "…"}]
        text, error, closed = "", None, False
        chunks = iter(gen)
        try:
            yield messages, case, gr.update(), gr.update(), gr.update(value="Answering…")
            for note in self.ctx.runtime.waiting(gen):  # behind other clinicians' answers: place in line, wait
                messages[-1] = {"role": "assistant", "content": f"_{note}_"}
                yield messages, case, gr.update(), gr.update(), gr.update(value=note)
            for chunk in chunks:
                text += chunk
                messages[-1] = {"role": "assistant", "content": model_markdown(text) + " ▌"}
                yield messages, case, gr.update(), gr.update(), gr.update()
        except Exception as e:  # the model failed mid-answer: record what there is, say so
            log.exception("generation failed")
            error = f"{type(e).__name__}: {e}"
        except GeneratorExit:  # the client went away mid-answer: stop as Stop does (frees the engine), record below
            closed = True
            gen.stop()
            try:
                for chunk in chunks:  # the few chunks already under way, until the generation ends
                    text += chunk
            except Exception as e:
                log.exception("generation failed")
                error = f"{type(e).__name__}: {e}"
        finally:
            self._running.pop(key, None)
        answer = gen.result
        if answer is None:  # failed before a result existed
            from core.engine import Answer

            answer = Answer(text.strip(), self.ctx.runtime.version, "error", 0, 0, None, 0.0, template=template)
        if closed:  # nobody to show it to: record the partial answer (stopped), never yield again
            try:
                self._record(who, case.conversation_id, context, question, images, answer, error, redo)
            except Exception:
                log.exception("could not record the answer of a closed session")
            return
        with user_errors():
            rec = self._record(who, case.conversation_id, context, question, images, answer, error, redo)
        case.conversation_id = rec.conversation_id
        case.context = context.to_dict()
        case.turns.append(PastTurn(question, answer.text, [i.sha256 for i in images], template))
        case.image_hashes += [i.sha256 for i in images]
        shown_answer = model_markdown(answer.text) or "_(no answer)_"
        messages[-1] = {"role": "assistant",
                        "content": shown_answer + footer(rec.version, answer.latency_s, rec.status, datetime.now(timezone.utc))}
        case.turn_ids[len(messages) - 1] = rec.turn_id
        case.messages = messages
        case.last_turn_id, case.last_answer = rec.turn_id, answer.text
        if error:
            raise gr.Error(f"The model failed while answering; the partial answer was kept. ({error})")
        status = (f"Answer #{rec.turn_id} from model **{rec.version}**" + (" (stopped)" if rec.status == "stopped" else "")
                  + (f", regenerated (answer #{redo.turn_id} is kept in the record)" if redo else "") + ": rate it below.")
        yield messages, case, gr.update(value=""), gr.update(value=answer.text), gr.update(value=status)

    @staticmethod
    def _key(who: Identity, request: Any) -> tuple[str, str]:
        """A running answer belongs to a session and its user: another user's session id stops nothing."""
        return who.name, getattr(request, "session_hash", None) or "direct"

    def stop(self, request: gr.Request) -> None:
        try:
            who = self.ctx.auth.identify(request)
        except Denied:
            return
        gen = self._running.get(self._key(who, request))
        if gen is not None:
            gen.stop()

    def regenerate(self, form: dict[str, Any], data: gr.RetryData, request: gr.Request) -> Iterator[tuple]:
        """The chat's Regenerate (retry) on the latest answer: the same question and images asked again,
        sampled, recorded as a new turn that names the old one (which stays in the store as it was, with
        its ratings). Yields what `ask` yields; the old answer leaves the chat and the case's history."""
        case: Case = form["case"]
        with user_errors():
            if not case.turns or not case.turn_ids:
                raise InputError("there is no finished answer to regenerate yet")
            answer_at = max(case.turn_ids)
            index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
            if int(index) != answer_at - 1:  # Gradio sends the index of the question the answer followed
                raise InputError("only the latest answer can be regenerated")
            last = case.turns[-1]
            redo = Redo(case.turn_ids[answer_at], last.question, last.template, last.image_hashes)
        given = set(last.image_hashes)
        rewound = dataclasses.replace(  # a new Case: if the new answer fails early, the page keeps the old one
            case, turns=case.turns[:-1], image_hashes=[h for h in case.image_hashes if h not in given],
            messages=case.messages[:answer_at - 1], turn_ids={i: t for i, t in case.turn_ids.items() if i < answer_at - 1},
        )
        yield from self.ask({**form, "case": rewound, "files": None, "question": last.question, "template": last.template,
                             "redo": redo}, request)

    def new_case(self) -> tuple:
        """Clear the conversation (outputs: messages, case, files, question, correction, rating status)."""
        return [], Case(), None, "", "", ""

    def like(self, case: Case, data: gr.LikeData, request: gr.Request) -> str:
        """Thumbs up/down on an answer in the chat: a quick rating from anyone."""
        with user_errors():
            who = self.ctx.auth.identify(request)
            admit(self.ctx, who, request, case)
            index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
            turn_id = case.turn_ids.get(int(index))
            if turn_id is None:
                raise InputError("only an answer can be rated, once it has finished")
            if data.liked in (True, "Like"):
                score, word = 5, "👍"
            elif data.liked in (False, "Dislike"):
                score, word = 1, "👎"
            else:
                return gr.update()
            with self.ctx.store.session() as s:
                rater = ensure_user(s, who)
                rating_id = st.add_rating(s, turn_id, rater.id, score, kind="thumbs").id
        gr.Info(f"{word} saved for answer #{turn_id}")
        return f"{word} saved for answer #{turn_id} (rating #{rating_id})."

    def rate(self, case: Case, score: Any, correction: str, diagnosis: str, flags: list, comment: str,
             request: gr.Request) -> str:
        """An expert's full rating of the latest answer; the rater is the signed-in user."""
        with user_errors():
            who = self.ctx.auth.require_rater(request)
            admit(self.ctx, who, request, case)
            if case.last_turn_id is None:
                raise InputError("ask a question first: there is no answer to rate yet")
            saved = save_rating(self.ctx, who, case.last_turn_id, score, correction=correction,
                                model_answer=case.last_answer, diagnosis=diagnosis, flags=flags, comment=comment)
        gr.Info(saved.message)
        return saved.message

    # -- the named API -------------------------------------------------------------
    def api_ask(self, images: Any, question: str, context: str, conversation_id: Any,
                request: gr.Request) -> tuple[str, int, int, str]:
        """/ask: (images, question, context JSON, conversation id or empty) -> (answer, conversation id, turn id, version).
        Gradio keeps the uploads under their original names, in a folder named by their content that
        concurrent calls with the same file share, so they are not deleted here but swept after
        `UPLOAD_MAX_AGE_S` (`demo.security.sweep_uploads`)."""
        with user_errors():
            who = self.ctx.auth.identify(request)
            admit(self.ctx, who, request)
            self.ctx.limits.upload(who.name, [upload_size(p) for p in file_paths(images)])
            question = check_question(question, self.ctx.settings.max_question_chars)
            turns: list[PastTurn] = []
            known: list[str] = []
            if conversation_id in (None, "") or str(conversation_id).strip() == "":
                cid = None
                ctx_obj = context_from_json(context)
            else:
                cid = parse_id(conversation_id, "conversation id")
                ctx_obj, turns = self._load_conversation(cid, who)
                known = [h for t in turns for h in t.image_hashes]
            images = self._new_images(self._intake(images), known)
            self.ctx.runtime.sync()
            key = f"conversation-{cid}" if cid is not None else f"new-{uuid.uuid4().hex}"
            gen = self.ctx.runtime.stream([i.image for i in images], question, context=None if turns else ctx_obj,
                                          history=self._history(turns, ctx_obj), generation=self.ctx.settings.generation(),
                                          conversation=key)
            for _ in gen:
                pass
            answer = gen.result
            rec = self._record(who, cid, ctx_obj, question, images, answer)
            if cid is None:  # the follow-ups of an API conversation name it by its stored id
                self.ctx.runtime.engine.kv_cache.rename(key, f"conversation-{rec.conversation_id}")
        return answer.text, rec.conversation_id, rec.turn_id, rec.version

    def _load_conversation(self, cid: int, who: Identity) -> tuple[ClinicalContext, list[PastTurn]]:
        from annotation_db.models import Conversation  # read-only: owner, context and templates

        with self.ctx.store.session() as s:
            conv = s.get(Conversation, cid)
            if conv is None:
                raise NotFound(f"no conversation with id {cid}")
            if conv.user.name != who.name:
                raise Denied(f"conversation {cid} belongs to another user")
            templates = {t.id: t.template for t in conv.turns}
            history = st.conversation_history(s, cid)
            context = dict(conv.context or {})
        turns = [PastTurn(h.question, h.answer, h.image_hashes, templates.get(h.turn_id, "free")) for h in history]
        return ClinicalContext.from_dict(context), turns

    def api_rate(self, turn_id: Any, score: Any, correction: str, diagnosis: str, comment: str,
                 request: gr.Request, flags: Any = None) -> int:
        """/rate: (turn id, score 1-5, correction, diagnosis, comment, flags) -> rating id, as the signed-in expert.
        Flags: a list (or comma-separated text) of hallucination, unsafe, incomplete, wrong_diagnosis;
        optional, so clients written before flags existed keep working."""
        with user_errors():
            who = self.ctx.auth.require_rater(request)
            admit(self.ctx, who, request)
            saved = save_rating(self.ctx, who, parse_id(turn_id, "turn id"), parse_score(score), correction=correction,
                                diagnosis=diagnosis, comment=comment, flags=parse_flags(flags))
        return saved.id
