"""The Gradio Blocks: Consult, Review and Insights tabs, and the named API (/ask, /rate, /erase, /conversation).

    demo = build_demo(settings, engine, store)          # what tests build
    demo.launch(**launch_kwargs(demo))                  # what `python -m demo` and app.py do

Only wiring lives here: the handlers are in `consult`, `review`, `insights` and `admin`.
Generation events share one concurrency slot ("generate"): with batching (`max_batch` > 1) it admits
two batches' worth and the scheduler keeps the line, telling each clinician their place and wait;
without, `DemoOptions.concurrency` answers at once and Gradio's queue shows the place.
Rating, review and insights run in their own slots and never wait behind generation.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from core.config import Settings
from core.prompts import FITZPATRICK, MODALITIES, TEMPLATE_LABELS, TEMPLATES
from demo import EXAMPLES_DIR
from demo.admin import TOMBSTONE_COLUMNS, Admin
from demo.auth import AuthConfig, Denied
from demo.common import FLAG_CHOICES, FLAG_VALUES, NOTICE, SCORE_CHOICES, Ctx
from demo.consult import CONTEXT_FIELDS, Case, Consult
from demo.conversation import Conversations
from demo.insights import EXPORT_FORMATS, Insights
from demo.page_js import PAGE_JS, ZOOM_CSS
from demo.pairwise import MODES, build_compare
from demo.review import KEYS_LEGEND, Review, ReviewState
from demo.runtime import DemoOptions, Runtime, attach

CSS = """
.dl-notice {border-left: 4px solid #2a7ab0; padding: 6px 12px !important; background: rgba(42,122,176,.08);}
.dl-banner {border-left: 4px solid #d08700; padding: 6px 12px !important; background: rgba(255,196,0,.15);}
.dl-saved {font-weight: 600;}
""" + ZOOM_CSS
EXAMPLE_CASES = [
    ("round-brown-macule.png", "What is this lesion and does it need a biopsy?", 34, "female", "left forearm", "years", "", "III", "clinical"),
    ("irregular-pigmented-lesion.png", "Describe the morphology and give a differential diagnosis.", 67, "male", "upper back",
     "4 months, growing", "occasional bleeding", "II", "dermoscopic"),
    ("red-scaly-plaque.png", "What is the most likely diagnosis and how can it be treated?", 25, "male", "extensor elbow",
     "6 weeks", "itching", "IV", "clinical"),
]


def _rating_controls(prefix: str) -> tuple:
    score = gr.Radio(SCORE_CHOICES, label="Score", value=None, elem_id=f"{prefix}-score")
    correction = gr.Textbox(label="Correction (edit the model's answer; leave unchanged if it is right)", lines=5,
                            elem_id=f"{prefix}-correction")
    with gr.Row():
        diagnosis = gr.Textbox(label="Diagnosis label (optional)", placeholder="e.g. melanoma", scale=1,
                               elem_id=f"{prefix}-diagnosis")
        comment = gr.Textbox(label="Comment (optional)", scale=2, elem_id=f"{prefix}-comment")
    flags = gr.CheckboxGroup(FLAG_CHOICES, label="Flags", elem_id=f"{prefix}-flags")
    return score, correction, diagnosis, flags, comment


PRIVATE: dict[str, Any] = {"api_visibility": "private"}  # page events: not in the named API


def build_demo(
    settings: Settings,
    engine: Any = None,
    store: Any = None,
    *,
    auth: AuthConfig | None = None,
    options: DemoOptions | None = None,
    runtime: Runtime | None = None,
) -> gr.Blocks:
    """The whole app. Give `runtime` (from `demo.runtime.start`) or an engine and a store."""
    options = options or DemoOptions()
    if runtime is None:
        assert engine is not None and store is not None, "build_demo needs a runtime, or an engine and a store"
        runtime = attach(settings, engine, store, options)
    auth = auth or AuthConfig.local(settings.local_user)
    ctx = Ctx(runtime, auth, options)
    generate = {"concurrency_limit": runtime.generation_slots(options.concurrency), "concurrency_id": "generate"}

    # Gradio deletes this app's cached files (upload copies, exports) older than 6 h, checking hourly.
    with gr.Blocks(title="DermaLoop", delete_cache=(3600, 6 * 3600)) as demo:
        with gr.Row(equal_height=True):  # the header, on every page
            gr.Markdown("# DermaLoop\nHuman-in-the-loop dermatology assistant: clinicians ask, experts correct, "
                        "the model learns.", elem_id="dl-title")
            who_md = gr.Markdown("", elem_id="dl-who")
            if auth.mode == "oauth":
                gr.LoginButton(size="sm", scale=0)
        gr.Markdown(NOTICE, elem_classes="dl-notice", elem_id="dl-notice")
        for i, notice in enumerate(runtime.notices):
            gr.Markdown(notice, elem_classes="dl-banner", elem_id=f"dl-banner-{i}")
        with gr.Tabs():
            consult = Consult(ctx)  # one for the page and the API: Stop finds answers by user and session
            rate_box, thumbs_hint = _consult_tab(consult, generate)
            admin = Admin(ctx)
            refused, review_panel, erase_box = _review_tab(ctx, admin)
            export_box, rollback_box = _insights_tab(ctx)
        _api(consult, admin, Conversations(ctx), generate)

        def on_load(request: gr.Request):
            """Show each person what their role allows (the handlers check again, server-side)."""
            try:
                who = auth.identify(request)
            except Denied as e:
                return (f"_{str(e).capitalize()}._", gr.update(visible=False), gr.update(visible=False),
                        gr.update(visible=True, value="Sign in to review answers."), gr.update(visible=False),
                        gr.update(visible=False), gr.update(visible=False))
            logout = " · [Sign out](logout)" if auth.mode == "password" else ""
            line = f"Signed in as **{who.name}** ({who.role}){logout}<br>Serving model **{runtime.version}**"
            refusal = (f"The Review tab is for expert raters. You are signed in as **{who.name}**, a {who.role}: "
                       "access refused.")
            return (line, gr.update(visible=who.can_rate), gr.update(visible=not who.can_rate),
                    gr.update(visible=not who.can_rate, value=refusal), gr.update(visible=who.can_rate),
                    gr.update(visible=who.can_rate), gr.update(visible=who.is_admin), gr.update(visible=who.is_admin))

        demo.load(on_load, None, [who_md, rate_box, thumbs_hint, refused, review_panel, export_box, rollback_box, erase_box],
                  **PRIVATE)
    demo.queue(default_concurrency_limit=16)
    demo.dermaloop = ctx  # type: ignore[attr-defined]  # for tests and launch_kwargs
    return demo


def _consult_tab(consult: Consult, generate: dict[str, Any]) -> tuple[gr.Accordion, gr.Markdown]:
    """Consult: images, context, the chat, expert rating. Returns what on_load shows by role."""
    settings = consult.ctx.settings
    with gr.Tab("Consult", id="consult"):
        case = gr.State(Case())
        with gr.Row():
            with gr.Column(scale=2, min_width=300):
                files = gr.File(label=f"Lesion images (up to {settings.max_images}; drag and drop, paste, or the camera on a phone)",
                                file_count="multiple", file_types=["image"], type="filepath", elem_id="dl-images")
                thumbs = gr.Gallery(label="Your images", height=140, columns=4, interactive=False, visible=True,
                                    elem_id="dl-thumbs", buttons=["fullscreen"], show_label=False)
                hints = gr.Markdown("", elem_id="dl-hints")
                template = gr.Dropdown([(TEMPLATE_LABELS.get(k, k), k) for k in TEMPLATES], value="free",
                                       label="Prompt", elem_id="dl-template")
                with gr.Accordion("Clinical context (optional, applies to the whole case)", open=False):
                    with gr.Row():
                        age = gr.Number(label="Age (years)", minimum=0, maximum=130, precision=0)
                        sex = gr.Dropdown(["", "female", "male", "other"], value="", label="Sex")
                    body_site = gr.Textbox(label="Body site", placeholder="e.g. left forearm")
                    duration = gr.Textbox(label="Duration", placeholder="e.g. 3 weeks")
                    symptoms = gr.Textbox(label="Symptoms", placeholder="e.g. itching, bleeding")
                    with gr.Row():
                        fitzpatrick = gr.Dropdown(["", *FITZPATRICK], value="", label="Fitzpatrick type")
                        modality = gr.Dropdown(["", *MODALITIES], value="", label="Image type")
            with gr.Column(scale=3, min_width=360):
                chatbot = gr.Chatbot(label="Consultation", height=420, elem_id="dl-chat", buttons=["copy"],
                                     placeholder="Upload one or more images, then ask a question. "
                                                 "Follow-up questions continue the same case.")
                question = gr.Textbox(label="Question", placeholder="e.g. What is this lesion and what should be done?",
                                      lines=2, max_lines=8, elem_id="dl-question")
                with gr.Row():
                    ask_btn = gr.Button("Ask", variant="primary", elem_id="dl-ask")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="dl-stop")
                    new_btn = gr.Button("New case", elem_id="dl-new")
        context_fields = [age, sex, body_site, duration, symptoms, fitzpatrick, modality]
        gr.Examples(
            [[[str(EXAMPLES_DIR / f)], q, *rest] for f, q, *rest in EXAMPLE_CASES],
            inputs=[files, question, *context_fields], label="Example cases (drawn phantoms, not patients)",
        )
        thumbs_hint = gr.Markdown("Use 👍 / 👎 under an answer to say whether it helped.", visible=True)
        with gr.Accordion("Rate the latest answer (experts)", open=True, visible=False) as rate_box:
            c_score, c_correction, c_diagnosis, c_flags, c_comment = _rating_controls("consult")
            rate_btn = gr.Button("Save rating", variant="primary", elem_id="consult-save")
        rate_status = gr.Markdown("", elem_id="consult-status", elem_classes="dl-saved")

    form = {"case": case, "files": files, "question": question, "template": template, **dict(zip(CONTEXT_FIELDS, context_fields))}

    def ask(values: dict, request: gr.Request):  # Gradio gives a set of inputs as one {component: value} dict
        yield from consult.ask({name: values[c] for name, c in form.items()}, request)

    gr.on([ask_btn.click, question.submit], ask, inputs=set(form.values()),
          outputs=[chatbot, case, question, c_correction, rate_status], api_name="consult_ask", **generate, **PRIVATE)

    def regenerate(values: dict, data: gr.RetryData, request: gr.Request):  # the chat's Retry on the latest answer
        yield from consult.regenerate({name: values[c] for name, c in form.items()}, data, request)

    chatbot.retry(regenerate, inputs=set(form.values()), outputs=[chatbot, case, question, c_correction, rate_status],
                  **generate, **PRIVATE)
    stop_btn.click(consult.stop, None, None, queue=False, **PRIVATE)
    files.upload(consult.clean_uploads, [files], [files], queue=False, **PRIVATE)
    files.change(consult.preview, [files], [thumbs, hints], queue=False, **PRIVATE)
    new_btn.click(consult.new_case, None, [chatbot, case, files, question, c_correction, rate_status], **PRIVATE)
    chatbot.like(consult.like, [case], [rate_status], **PRIVATE)
    rate_btn.click(consult.rate, [case, c_score, c_correction, c_diagnosis, c_flags, c_comment], [rate_status],
                   api_name="consult_rate", **PRIVATE)
    return rate_box, thumbs_hint


def _review_tab(ctx: Ctx, admin: Admin) -> tuple[gr.Markdown, gr.Column, gr.Accordion]:
    """Review: the experts' queue, and erasure for admins. Returns the refusal note, the panel and the
    erasure box, shown by role."""
    review = Review(ctx)
    with gr.Tab("Review", id="review") as review_tab:
        r_state = gr.State(ReviewState())
        refused = gr.Markdown("", visible=False, elem_id="review-refused")
        with gr.Column(visible=False) as review_panel:
            mode = gr.Radio(MODES, value="rate", label="Mode", elem_id="review-mode",
                            info="Rate one answer at a time, or compare two versions' answers blind")
            with gr.Column() as rate_col:
                with gr.Row(equal_height=True):
                    counter = gr.Markdown("", elem_id="review-counter")
                    blind = gr.Checkbox(label="Blind review (hide the model version)", value=False, elem_id="review-blind")
                    reload_btn = gr.Button("Reload queue", size="sm", scale=0)
                with gr.Row(equal_height=True):
                    show = gr.Radio([("All", "all"), ("Flagged", "flagged"), ("Low score", "low")], value="all",
                                    label="Show", elem_id="review-show", scale=2)
                    version = gr.Dropdown([("All versions", "")], value="", label="Model version", elem_id="review-version-filter",
                                          scale=1)
                gr.Markdown(KEYS_LEGEND, elem_id="review-keys")
                with gr.Row():
                    gallery = gr.Gallery(label="Images (captioned with the question they were given with)", height=300,
                                         columns=2, interactive=False, scale=2, elem_id="review-images")
                    with gr.Column(scale=3):
                        r_history = gr.Markdown("", elem_id="review-history")
                        r_context = gr.Markdown("", elem_id="review-context")
                        r_question = gr.Markdown("", elem_id="review-question")
                        r_answer = gr.Markdown("", elem_id="review-answer", container=True)
                        r_version = gr.Markdown("", elem_id="review-version")
                r_score, r_correction, r_diagnosis, r_flags, r_comment = _rating_controls("review")
                with gr.Row():
                    save_btn = gr.Button("Save rating & next", variant="primary", elem_id="review-save")
                    skip_btn = gr.Button("Skip", elem_id="review-skip")
                r_status = gr.Markdown("", elem_id="review-status", elem_classes="dl-saved")
            build_compare(ctx, mode, rate_col, review_tab, PRIVATE)
        with gr.Accordion("Erase a conversation (admins)", open=False, visible=False, elem_id="erase-box") as erase_box:
            gr.Markdown("When a patient withdraws consent or a wrong image was uploaded: the conversation's questions, "
                        "answers, images and rating texts are removed for good; a tombstone keeps who, when and why, "
                        "and which model versions were trained on it (retrain those).")
            with gr.Row():
                e_conv = gr.Number(label="Conversation id (shown with each answer under review)", precision=0,
                                   elem_id="erase-conversation")
                e_reason = gr.Textbox(label="Reason", placeholder="e.g. consent withdrawn", elem_id="erase-reason")
            e_confirm = gr.Checkbox(label="I understand this cannot be undone", value=False, elem_id="erase-confirm")
            e_btn = gr.Button("Erase conversation", variant="stop", elem_id="erase-button")
            e_status = gr.Markdown("", elem_id="erase-status")
            e_table = gr.Dataframe(headers=TOMBSTONE_COLUMNS, label="Erasures (tombstones)", interactive=False,
                                   elem_id="erase-table")

    review_out = [r_state, counter, gallery, r_context, r_question, r_answer, r_version,
                  r_score, r_correction, r_diagnosis, r_flags, r_comment, r_history, show, version, r_status]
    gr.on([show.input, version.input], review.filter, [r_state, blind, show, version], review_out, **PRIVATE)
    review_tab.select(review.open, [r_state, blind], review_out, **PRIVATE)
    reload_btn.click(review.load, [r_state, blind], review_out, **PRIVATE)
    blind.change(review.load, [r_state, blind], review_out, **PRIVATE)
    save_btn.click(review.save, [r_state, blind, r_score, r_correction, r_diagnosis, r_flags, r_comment],
                   review_out, **PRIVATE)
    skip_btn.click(review.skip, [r_state, blind], review_out, **PRIVATE)
    e_btn.click(admin.erase, [e_conv, e_reason, e_confirm], [e_status, e_table], api_name="admin_erase",
                **PRIVATE).success(lambda: False, None, e_confirm, **PRIVATE)  # each erasure confirmed anew
    erase_box.expand(admin.tombstones, None, [e_table], **PRIVATE)
    return refused, review_panel, erase_box


def _insights_tab(ctx: Ctx) -> tuple[gr.Accordion, gr.Accordion]:
    """Insights: figures, tables, export, rollback. Returns the export and rollback boxes, shown by role."""
    insights = Insights(ctx)
    with gr.Tab("Insights", id="insights") as insights_tab:
        with gr.Row(equal_height=True):
            summary = gr.Markdown("", elem_id="insights-summary")
            refresh_btn = gr.Button("Refresh", size="sm", scale=0)
        with gr.Row():
            score_plot = gr.BarPlot(x="version", y="mean_score", y_lim=[0, 5], title="Mean expert score (1-5)",
                                    x_title="model version", y_title="mean score")
            share_plot = gr.BarPlot(x="bar", y="share", color="measure", y_lim=[0, 1], sort=None,
                                    title="Share of rated answers", x_title="model version and measure",
                                    y_title="share")
        with gr.Row():
            trend_plot = gr.ScatterPlot(x="period", y="mean_score", color="version", y_lim=[0, 5],
                                        title="Mean expert score per day", x_title="day", y_title="mean score")
            runs_plot = gr.ScatterPlot(x="run", y="value", color="series", title="Refinement gate: active vs candidate",
                                       x_title="training run", y_title="gate metric (see table)")
        table = gr.Dataframe(label="Per model version", interactive=False, elem_id="insights-table")
        with gr.Row():
            agreement = gr.Dataframe(label="Inter-rater agreement (experts)", interactive=False)
            versions = gr.Dataframe(label="Model versions", interactive=False)
        runs = gr.Dataframe(label="Refine history (runs, decisions, metrics)", interactive=False)
        gr.Markdown("### Version against version")
        pair_words = gr.Markdown("", elem_id="insights-pairwise")
        pair_table = gr.Dataframe(label="Blind pairwise review by experts (win rate: ties left out; 95 % Wilson interval)",
                                  interactive=False, elem_id="insights-pairwise-table")
        metric_words = gr.Markdown("", elem_id="insights-metrics-note")
        metric_table = gr.Dataframe(label="Gate metrics: each candidate against the version it was compared with (★ decided)",
                                    interactive=False, elem_id="insights-metrics")
        gr.Markdown("### Refine runs: gate report and learning curve")
        with gr.Row():
            run_pick = gr.Dropdown([], label="Refine run", elem_id="insights-run", scale=1)
            run_note = gr.Markdown("", elem_id="insights-run-note")
        with gr.Row():
            run_md = gr.Markdown("", elem_id="insights-run-report", container=True)
            loss_plot = gr.LinePlot(x="step", y="loss", title="Learning curve (training loss, answer tokens)",
                                    x_title="step", y_title="loss", visible=False, elem_id="insights-loss")
        with gr.Accordion("Export the store", open=False, visible=False) as export_box:
            with gr.Row():
                fmt = gr.Radio(list(EXPORT_FORMATS), value="csv", label="Format")
                export_btn = gr.Button("Export", scale=0)
            export_files = gr.File(label="Download", file_count="multiple", interactive=False)
        with gr.Accordion("Roll back the model (admins)", open=False, visible=False) as rollback_box:
            with gr.Row():
                rb_version = gr.Dropdown([], label="Version to make active again")
                rb_reason = gr.Textbox(label="Reason")
                rb_btn = gr.Button("Roll back", variant="stop", scale=0)
            rb_status = gr.Markdown("")

    insights_out = [table, score_plot, share_plot, trend_plot, agreement, runs, runs_plot, versions, rb_version, summary]
    versus_out = [pair_words, pair_table, metric_words, metric_table, run_pick, run_note]
    for event in (insights_tab.select, refresh_btn.click):
        event(insights.refresh, None, insights_out, **PRIVATE)
        event(insights.versus, None, versus_out, **PRIVATE).then(insights.run_report, [run_pick], [run_md, loss_plot, run_note],
                                                                 **PRIVATE)
    run_pick.input(insights.run_report, [run_pick], [run_md, loss_plot, run_note], **PRIVATE)
    export_btn.click(insights.export, [fmt], [export_files], **PRIVATE)
    rb_btn.click(insights.rollback, [rb_version, rb_reason], [rb_status], **PRIVATE)
    return export_box, rollback_box


def _api(consult: Consult, admin: Admin, conversations: Conversations, generate: dict[str, Any]) -> None:
    """The named API `/ask`, `/rate`, `/erase` and `/conversation` (hidden components; documented in docs/api.md)."""
    with gr.Column(visible=False):
        api_images = gr.File(file_count="multiple", type="filepath", label="images")
        api_question = gr.Textbox(label="question")
        api_context = gr.Textbox(label="context")
        api_conversation = gr.Textbox(label="conversation_id")
        api_answer = gr.Textbox(label="answer")
        api_conv_out = gr.Number(label="conversation_id", precision=0)
        api_turn_out = gr.Number(label="turn_id", precision=0)
        api_version = gr.Textbox(label="model_version")
        # No precision: Gradio would round 1.5 to 2 (another answer); parse_id/parse_score refuse it.
        api_turn_in = gr.Number(label="turn_id")
        api_score = gr.Number(label="score")
        api_correction = gr.Textbox(label="correction")
        api_diagnosis = gr.Textbox(label="diagnosis")
        api_comment = gr.Textbox(label="comment")
        api_flags = gr.Dropdown(FLAG_VALUES, multiselect=True, allow_custom_value=True, value=[], label="flags")
        api_rating = gr.Number(label="rating_id", precision=0)
        api_reason = gr.Textbox(label="reason")
        api_tombstone = gr.Textbox(label="tombstone")
        api_ask_btn = gr.Button("ask")
        api_rate_btn = gr.Button("rate")
        api_erase_btn = gr.Button("erase")
        api_read_btn = gr.Button("conversation")
        api_view = gr.Textbox(label="conversation")
    api_ask_btn.click(consult.api_ask, [api_images, api_question, api_context, api_conversation],
                      [api_answer, api_conv_out, api_turn_out, api_version], api_name="ask", **generate)
    api_rate_btn.click(consult.api_rate, [api_turn_in, api_score, api_correction, api_diagnosis, api_comment, api_flags],
                       [api_rating], api_name="rate")
    api_erase_btn.click(admin.api_erase, [api_conversation, api_reason], [api_tombstone], api_name="erase")
    api_read_btn.click(conversations.api_conversation, [api_conversation], [api_view], api_name="conversation")


def launch_kwargs(demo: gr.Blocks, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of `demo.launch` that the app needs (auth, limits, styling)."""
    ctx: Ctx = demo.dermaloop  # type: ignore[attr-defined]
    kwargs: dict[str, Any] = {
        "max_file_size": ctx.settings.max_upload_bytes,
        "allowed_paths": [str(EXAMPLES_DIR)],
        "css": CSS,
        "js": PAGE_JS,  # the Review tab's keyboard path; paste-to-upload and zoom in Consult
        "theme": gr.themes.Soft(primary_hue="teal"),
        "footer_links": ["api", "settings"],
        "run_history": False,  # never keep clinical questions in the browser
    }
    from starlette.middleware import Middleware

    from demo.security import ExportGuard, HealthEndpoint, LoginGuard, keep_queue_alive_on_evicted_sessions

    keep_queue_alive_on_evicted_sessions()
    middleware = [Middleware(HealthEndpoint, blocks=demo), Middleware(ExportGuard, links=ctx.links, auth=ctx.auth)]
    if ctx.auth.mode == "password":
        guard = LoginGuard(ctx.auth)
        kwargs["auth"] = guard.check
        kwargs["auth_message"] = "DermaLoop: research use only. Sign in with the account your administrator gave you."
        middleware.append(guard.middleware())
    kwargs["app_kwargs"] = {"middleware": middleware}
    kwargs.update(overrides)
    return kwargs
