"""Consult in a real browser (Chromium via Playwright): paste images, see thumbnails and quality
hints, ask, zoom an image in the conversation, regenerate the answer, ask a follow-up; an expert
then finds the follow-up under the "Low score" filter with the conversation that led to it; and
Insights says in words that a fresh store has nothing yet. Screenshots go to test-artifacts/.

    python -m pytest -q tests/test_browser_consult.py
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from test_browser import EXAMPLE, PAGES, open_tab, shot, shots_on_failure, sign_in

from annotation_db import store as st
from demo.auth import AuthConfig, add_user

from conftest import CHROMIUM, draw_lesion
from test_api import App

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium)"),
]

# What a browser does on Ctrl+V with an image on the clipboard: a paste event whose clipboardData holds the file.
PASTE = """async (b64s) => {
  const dt = new DataTransfer();
  b64s.forEach((b64) => dt.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], "image.png", {type: "image/png"})));
  const ev = new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true});
  document.querySelector("#dl-question textarea").dispatchEvent(ev);
  return ev.defaultPrevented;
}"""


def png_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def dark_small_png() -> bytes:
    buf = io.BytesIO()
    draw_lesion(size=(96, 80), colour=(20, 10, 5), background=(34, 24, 18)).save(buf, format="PNG")
    return buf.getvalue()


def users(tmp_path: Path) -> AuthConfig:
    path = tmp_path / "users.yaml"
    for name, role in (("eve", "expert"), ("cara", "clinician")):
        add_user(path, name, role, f"{name}-password", rounds=4)
    return AuthConfig.from_file(path)


def test_paste_zoom_regenerate_follow_up_and_review_it_by_filter(browser, tiny_model_dir, tmp_path):
    app = App(tmp_path / "home", tiny_model_dir, auth=users(tmp_path), max_new_tokens=8)
    with shots_on_failure(app, "consult"):
        page = sign_in(browser, app, "cara")
        # -- paste two images (a drawn phantom and a dark, small photo): both become uploads, with thumbnails
        assert page.evaluate(PASTE, [png_b64(EXAMPLE.read_bytes()), png_b64(dark_small_png())])  # no text: paste handled
        page.wait_for_function("document.querySelectorAll('#dl-thumbs img').length === 2")
        names = page.inner_text("#dl-images")
        assert names.count(".png") == 2 and "image.png" not in names  # renamed after their pixels by the server
        page.wait_for_selector("#dl-hints >> text=Before you ask")
        hints = page.inner_text("#dl-hints")
        assert "Image 2: The image is small" in hints and "Image 2: The image looks dark" in hints
        shot(page, "consult-paste-thumbnails-hints")

        # -- ask about them; both appear in the conversation; a click shows one enlarged
        page.fill("#dl-question textarea", "What is this lesion?")
        page.click("#dl-ask")
        page.wait_for_selector("#dl-chat >> text=model v1")
        assert page.locator("#dl-chat img").count() == 2
        small = page.locator("#dl-chat img").first.bounding_box()
        page.locator("#dl-chat img").first.click()
        page.wait_for_selector("#dl-zoom img")
        big = page.locator("#dl-zoom img").bounding_box()
        assert big["width"] > 2 * small["width"] and big["height"] > 2 * small["height"]
        shot(page, "consult-zoom")
        page.keyboard.press("Escape")
        page.wait_for_selector("#dl-zoom", state="detached")

        # -- regenerate: a new answer replaces the old in the chat; both stay in the store
        with app.store.session() as s:
            first = st.conversation_history(s, 1)[0]
        page.locator("#dl-chat button[aria-label=Retry]").click()
        page.wait_for_selector(f"#consult-status >> text=answer #{first.turn_id} is kept")
        assert page.inner_text("#dl-chat").count("model v1") == 1
        with app.store.session() as s:
            all_turns = st.conversation_history(s, 1, regenerated=True)
            live = st.conversation_history(s, 1)
        assert [t.turn_id for t in all_turns] == [first.turn_id, live[0].turn_id] and all_turns[0].answer == first.answer
        assert live[0].regenerates_id == first.turn_id and len(live[0].image_hashes) == 2
        shot(page, "consult-regenerated")

        # -- a follow-up, disliked by the clinician
        page.fill("#dl-question textarea", "Is it urgent?")
        page.click("#dl-ask")
        page.wait_for_function("document.querySelector('#dl-chat').innerText.split('model v1').length === 3")
        page.locator("#dl-chat button[aria-label=Dislike]").last.click()
        page.wait_for_selector("#consult-status >> text=saved")
        shot(page, "consult-follow-up")

        # -- an expert filters the queue to low scores: the follow-up, with the conversation that led to it
        expert = sign_in(browser, app, "eve")
        open_tab(expert, "Review")
        expert.wait_for_selector("#review-counter >> text=left to review")
        assert "Low score (1)" in expert.inner_text("#review-show") and "All (3)" in expert.inner_text("#review-show")
        expert.locator("#review-show").get_by_text("Low score (1)").click()
        expert.wait_for_selector("#review-question >> text=Is it urgent?")
        assert "(low score)" in expert.inner_text("#review-counter")
        history = expert.inner_text("#review-history")
        assert "Q1: What is this lesion?" in history and "1 earlier turn" in history  # the regenerated answer is not counted
        assert "Follow-up question" in expert.inner_text("#review-question")
        expert.wait_for_function("document.querySelectorAll('#review-images img').length >= 2")
        assert "given with Q1 (Q1.2)" in expert.inner_text("#review-images")
        shot(expert, "review-filters-follow-up")


def test_insights_says_in_words_that_there_is_nothing_yet(browser, tiny_model_dir, tmp_path):
    app = App(tmp_path / "home", tiny_model_dir, auth=users(tmp_path), max_new_tokens=4)
    try:
        page = sign_in(browser, app, "eve")
        open_tab(page, "Insights")
        page.wait_for_selector("#insights-summary >> text=No answers yet")
        assert "No refinement yet" in page.inner_text("#insights-summary")
        assert not page.locator("#insights-loss").is_visible()
        shot(page, "insights-empty")
    finally:
        PAGES.clear()
        app.close()
