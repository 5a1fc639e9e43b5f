"""Review, "Compare two answers": blind pairwise review of two model versions by experts.

`Compare(ctx)` has the handlers (`show` for the mode switch and the tab, `load`,
`judge`, `skip`); `build_compare(ctx, mode, tab)` lays out the panel inside the
Review tab and wires it. Each handler returns a dict of named values (`PANEL`), so
tests call them directly and read them by name.

Cases come from `annotation_db.pairwise` (queued by `python -m training.refine
--human-gate N`): the images, clinical context and question, then answers A and B
side by side without version names, in an order drawn per case and rater. The
expert says "A better", "B better" or "Tie" (keys A, B, T: `demo.keys`), with an
optional correction (the answer they would give); then the versions are revealed,
and Enter (or N) shows the next pair. Experts and admins only, checked server-side;
answers to one's own questions only with `Settings.review_own_answers`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import gradio as gr

from annotation_db import pairwise as pw
from core.errors import InputError
from core.images import ImageError, load_stored
from demo.common import Ctx, admit, blank_to_none, ensure_user, model_markdown, plain, user_errors
from demo.review import describe_context

log = logging.getLogger("dermaloop.demo")

PANEL = ("counter", "images", "context", "question", "head_a", "answer_a", "head_b", "answer_b", "correction",
         "judge_row", "next_btn", "status")  # every output of the compare handlers, in wiring order
MODES = [("Rate answers", "rate"), ("Compare two answers", "compare")]
PAIR_KEYS_LEGEND = ("⌨️ **Keyboard:** <kbd>A</kbd> A better · <kbd>B</kbd> B better · <kbd>T</kbd> tie · "
                    "<kbd>E</kbd> write a correction · <kbd>S</kbd> skip · <kbd>Enter</kbd> or <kbd>N</kbd> next pair "
                    "(after judging) · <kbd>Esc</kbd> leave a text field")
CHOICE_BUTTONS = {"a": "A better", "b": "B better", "tie": "Tie"}


@dataclass
class PairState:
    case_id: int | None = None
    judged: bool = False  # the versions of the pair on screen are revealed
    skipped: set[int] = field(default_factory=set)
    owner: str | None = None  # the signed-in user this page belongs to (demo.common.bind)


class Compare:
    def __init__(self, ctx: Ctx):
        self.ctx = ctx

    @property
    def _own(self) -> bool:
        return bool(getattr(self.ctx.settings, "review_own_answers", False))

    def _counter(self, left: int, state: PairState) -> str:
        skipped = f" ({len(state.skipped)} skipped this session)" if state.skipped else ""
        return f"**{left}** pair{'s' if left != 1 else ''} left to compare{skipped}"

    def _images(self, pair: pw.PairToJudge) -> tuple[list, int]:
        images, missing = [], 0
        for i, h in enumerate(pair.image_hashes):  # a lost file must not block the queue: show the rest, say so
            try:
                images.append((load_stored(self.ctx.settings.images_dir, h), f"image {i + 1}"))
            except (ImageError, OSError, ValueError):
                log.warning("pairwise case #%s: stored image %s… cannot be read", pair.case_id, h[:12])
                missing += 1
        return images, missing

    def _next(self, who: Any, state: PairState, status: str = "") -> dict[str, Any]:
        with self.ctx.store.session() as s:
            rater = ensure_user(s, who)
            kw = dict(include_own=self._own, skip=state.skipped)
            pair = pw.next_pair(s, rater.id, **kw)
            left = pw.pairs_left(s, rater.id, **kw)
            own_waiting = not self._own and pair is None and pw.pairs_left(s, rater.id, include_own=True, skip=state.skipped) > 0
        state.case_id, state.judged = (pair.case_id if pair else None), False
        out = {"counter": self._counter(left, state), "correction": "", "judge_row": gr.update(visible=pair is not None),
               "next_btn": gr.update(visible=False), "status": status}
        if pair is None:
            empty = ("🎉 No pairs left to compare. Pairs are queued when a refined candidate waits for expert review "
                     "(`python -m training.refine --human-gate N`): both versions answer the same cases.")
            if state.skipped:
                empty = "Only skipped pairs are left; reload the page to see them again."
            if own_waiting:
                empty += (" Pairs from your own questions are not shown here; to judge them yourself, start the app "
                          "with `--review-own-answers` (DERMALOOP_REVIEW_OWN_ANSWERS=1).")
            return {**out, "images": [], "context": "", "question": empty, "head_a": "", "answer_a": "", "head_b": "",
                    "answer_b": ""}
        images, missing = self._images(pair)
        note = (f"\n\n⚠️ **{missing} of its {len(pair.image_hashes)} images are missing from the data directory**; "
                "judge what you can, or skip." if missing else "")
        return {**out, "images": images, "context": describe_context(pair.context),
                "question": f"**Question (pair #{pair.case_id}):** {plain(pair.question)}{note}",
                "head_a": "### Answer A", "answer_a": model_markdown(pair.answer_a) or "_(empty answer)_",
                "head_b": "### Answer B", "answer_b": model_markdown(pair.answer_b) or "_(empty answer)_"}

    def _rater(self, state: PairState, request: Any) -> Any:
        who = self.ctx.auth.require_rater(request)
        admit(self.ctx, who, request, state)
        return who

    def show(self, mode: str, state: PairState, request: gr.Request) -> dict[str, Any]:
        """The mode switch (and opening the tab): show the chosen panel; in compare mode, the pair on
        screen (kept, with what was typed) or the next one."""
        out: dict[str, Any] = {"rate_col": gr.update(visible=mode != "compare"),
                               "compare_col": gr.update(visible=mode == "compare")}
        if mode != "compare":
            return {**out, **{k: gr.update() for k in PANEL}}
        with user_errors():
            who = self._rater(state, request)
            if state.case_id is not None and not state.judged:
                with self.ctx.store.session() as s:
                    left = pw.pairs_left(s, ensure_user(s, who).id, include_own=self._own, skip=state.skipped)
                return {**out, **{k: gr.update() for k in PANEL}, "counter": self._counter(left, state)}
            return {**out, **self._next(who, state)}

    def load(self, state: PairState, request: gr.Request) -> dict[str, Any]:
        """The next pair (the "Next pair" button, Enter after judging)."""
        with user_errors():
            return self._next(self._rater(state, request), state)

    def skip(self, state: PairState, request: gr.Request) -> dict[str, Any]:
        with user_errors():
            who = self._rater(state, request)
            if state.case_id is not None and not state.judged:
                state.skipped.add(state.case_id)
            return self._next(who, state, "Skipped.")

    def judge(self, state: PairState, choice: str, correction: str | None, request: gr.Request) -> dict[str, Any]:
        """Record "a", "b" or "tie" for the pair on screen (with the correction, if any), then reveal the versions."""
        with user_errors():
            who = self._rater(state, request)
            if state.case_id is None:
                raise InputError("there is no pair on screen to judge")
            if state.judged:
                raise InputError("this pair is judged already: press Next pair")
            with self.ctx.store.session() as s:
                rater = ensure_user(s, who)
                done = pw.record_preference(s, state.case_id, rater.id, choice, correction=blank_to_none(correction),
                                            include_own=self._own)
                left = pw.pairs_left(s, rater.id, include_own=self._own, skip=state.skipped)
            state.judged = True
        log.info("pairwise preference %s by %s on case %s: %s", done.preference_id, who.name, done.case_id, done.winner)
        gr.Info(f"Saved: {CHOICE_BUTTONS[done.choice]}. A was {done.version_a}, B was {done.version_b}.")
        role = {done.candidate: "candidate", done.active: "active"}
        mark = {"a": (" ✅", ""), "b": ("", " ✅"), "tie": (" 🤝", " 🤝")}[done.choice]
        return {
            "counter": self._counter(left, state),
            "head_a": f"### Answer A · {done.version_a} ({role[done.version_a]}){mark[0]}",
            "head_b": f"### Answer B · {done.version_b} ({role[done.version_b]}){mark[1]}",
            "judge_row": gr.update(visible=False), "next_btn": gr.update(visible=True),
            "status": done.message + " Press **Enter** (or **Next pair**) to go on.",
            **{k: gr.update() for k in ("images", "context", "question", "answer_a", "answer_b", "correction")},
        }

    def judge_a(self, state: PairState, correction: str | None, request: gr.Request) -> dict[str, Any]:
        return self.judge(state, "a", correction, request)

    def judge_b(self, state: PairState, correction: str | None, request: gr.Request) -> dict[str, Any]:
        return self.judge(state, "b", correction, request)

    def judge_tie(self, state: PairState, correction: str | None, request: gr.Request) -> dict[str, Any]:
        return self.judge(state, "tie", correction, request)


def _by_component(fn: Callable[..., dict[str, Any]], components: dict[str, Any]) -> Callable[..., dict]:
    """Wrap a handler returning {name: value} for Gradio, which wants {component: value}."""

    @functools.wraps(fn)  # keeps the signature: Gradio injects gr.Request by its annotation
    def wrapper(*args: Any, **kwargs: Any) -> dict:
        return {components[k]: v for k, v in fn(*args, **kwargs).items()}

    return wrapper


def build_compare(ctx: Ctx, mode: gr.Radio, rate_col: gr.Column, tab: gr.Tab, private: dict[str, Any]) -> gr.Column:
    """The compare panel (hidden until `mode` is "compare") and its events; returns its column."""
    compare = Compare(ctx)
    state = gr.State(PairState())
    with gr.Column(visible=False, elem_id="pair-panel") as compare_col:
        c: dict[str, Any] = {}
        c["counter"] = gr.Markdown("", elem_id="pair-counter")
        gr.Markdown(PAIR_KEYS_LEGEND, elem_id="pair-keys")
        with gr.Row():
            c["images"] = gr.Gallery(label="Images", height=260, columns=2, interactive=False, scale=2,
                                     elem_id="pair-images")
            with gr.Column(scale=3):
                c["context"] = gr.Markdown("", elem_id="pair-context")
                c["question"] = gr.Markdown("", elem_id="pair-question")
        with gr.Row(equal_height=True):
            with gr.Column():
                c["head_a"] = gr.Markdown("", elem_id="pair-head-a")
                c["answer_a"] = gr.Markdown("", elem_id="pair-answer-a", container=True)
            with gr.Column():
                c["head_b"] = gr.Markdown("", elem_id="pair-head-b")
                c["answer_b"] = gr.Markdown("", elem_id="pair-answer-b", container=True)
        c["correction"] = gr.Textbox(label="Correction (optional): the answer you would give; it becomes training data",
                                     lines=3, elem_id="pair-correction")
        with gr.Row() as judge_row:
            a_btn = gr.Button("A better", variant="primary", elem_id="pair-a")
            tie_btn = gr.Button("Tie", elem_id="pair-tie")
            b_btn = gr.Button("B better", variant="primary", elem_id="pair-b")
            skip_btn = gr.Button("Skip", elem_id="pair-skip")
        c["judge_row"] = judge_row
        c["next_btn"] = gr.Button("Next pair", variant="primary", visible=False, elem_id="pair-next")
        c["status"] = gr.Markdown("", elem_id="pair-status", elem_classes="dl-saved")
    outputs = [c[k] for k in PANEL]
    shown = {**c, "rate_col": rate_col, "compare_col": compare_col}
    show_outputs = [rate_col, compare_col, *outputs]
    mode.input(_by_component(compare.show, shown), [mode, state], show_outputs, **private)
    tab.select(_by_component(compare.show, shown), [mode, state], show_outputs, **private)
    for btn, handler in ((a_btn, compare.judge_a), (b_btn, compare.judge_b), (tie_btn, compare.judge_tie)):
        btn.click(_by_component(handler, c), [state, c["correction"]], outputs, **private)
    skip_btn.click(_by_component(compare.skip, c), [state], outputs, **private)
    c["next_btn"].click(_by_component(compare.load, c), [state], outputs, **private)
    return compare_col
