"""A real browser (Debian's Chromium, driven by Playwright) against the app on loopback.

An expert uploads an image, asks, watches the answer stream in with its model
version, rates it with a correction; a second expert finds it in the Review tab and
rates it; it is counted in Insights; a clinician is refused the Review tab.
Screenshots of each tab are saved under test-artifacts/.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest

from demo.auth import AuthConfig, add_user

from conftest import CHROMIUM
from test_api import App

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
EXAMPLE = Path(__file__).resolve().parents[1] / "demo" / "examples" / "irregular-pigmented-lesion.png"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    users = d / "users.yaml"
    for name, role in (("eve", "expert"), ("max", "expert"), ("cara", "clinician")):
        add_user(users, name, role, f"{name}-password", rounds=4)
    a = App(d / "home", tiny_model_dir, auth=AuthConfig.from_file(users), max_new_tokens=12)
    a.token_delay_s = 0.15
    yield a
    a.close()


PAGES: list = []  # every page opened, screenshotted if the test fails


def sign_in(browser, app: App, name: str):
    page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
    PAGES.append(page)
    page.set_default_timeout(30_000)
    page.goto(app.url)
    page.fill("input[type=text]", name)
    page.fill("input[type=password]", f"{name}-password")
    page.get_by_role("button", name="Login").click()
    page.wait_for_selector("#dl-who >> text=Signed in as")
    return page


def upload(page, path: Path) -> None:
    """Upload through the file input and wait until the box shows the clean copy. The input can be
    re-rendered while the page settles (seen on a loaded machine), so a lost upload is retried."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    # The app replaces the upload at once by its clean copy, named by its pixels' SHA-256.
    shown = "/[0-9a-f]{16}/.test(document.querySelector('#dl-images').innerText)"
    for attempt in range(3):
        page.set_input_files("#dl-images input[type=file]", [str(path)])
        try:
            page.wait_for_function(shown, timeout=15_000)
            return
        except PlaywrightTimeout:
            if attempt == 2:
                raise


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@contextlib.contextmanager
def shots_on_failure(app: App | None, label: str):
    """Run a browser flow: every open page is screenshotted if it fails, and the pages are forgotten and
    `app` (if given: a fixture closes its own) closed either way."""
    try:
        yield
    except Exception:
        for i, p in enumerate(PAGES):
            shot(p, f"failure-{label}-{i}")
        raise
    finally:
        PAGES.clear()
        if app is not None:
            app.close()


def test_ask_rate_review_insights_and_roles(app, browser):
    with shots_on_failure(None, "flow"):
        flow(app, browser)


def flow(app: App, browser) -> None:
    # -- an expert asks and sees the answer stream in, with its model version -------------
    page = sign_in(browser, app, "eve")
    assert "Research use only" in page.inner_text("#dl-notice")
    upload(page, EXAMPLE)
    page.fill("#dl-question textarea", "What is this lesion and what should be done?")
    page.click("#dl-ask")
    chat = page.locator("#dl-chat")
    page.wait_for_function("document.querySelector('#dl-chat').innerText.includes('▌')")  # still streaming
    partial = chat.inner_text()
    page.wait_for_selector("#dl-chat >> text=model v1")
    final = chat.inner_text()
    assert "▌" not in final and len(final) > len(partial.split("▌")[0])
    # the image is shown in the conversation at the turn it was given, and as a thumbnail where it was uploaded
    assert page.locator("#dl-chat img").count() >= 1
    assert page.locator("#dl-thumbs img").count() >= 1
    assert page.evaluate("document.querySelectorAll('#dl-chat script').length") == 0
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", final)  # each answer: its version and time
    answer = app_answer(app)
    assert page.input_value("#consult-correction textarea") == answer  # pre-filled for correction
    shot(page, "consult")

    # -- ... and rates it with a correction ----------------------------------------------
    page.locator("#consult-score").get_by_text("2 · poor").click()
    page.fill("#consult-correction textarea", "Irregular pigmented lesion: refer for dermoscopy and excision biopsy.")
    page.fill("#consult-diagnosis textarea, #consult-diagnosis input", "melanoma")
    page.click("#consult-save")
    page.wait_for_selector("#consult-status >> text=saved")
    assert "with your correction" in page.inner_text("#consult-status")

    # -- another expert finds it in the Review tab --------------------------------------------
    page2 = sign_in(browser, app, "max")
    open_tab(page2, "Review")
    page2.wait_for_selector("#review-counter >> text=left to review")
    assert re.search(r"\b1\s+answer left", page2.inner_text("#review-counter"))
    assert "What is this lesion and what should be done?" in page2.inner_text("#review-question")
    assert "v1" in page2.inner_text("#review-version")
    page2.locator("#review-blind input").check()
    page2.wait_for_selector("#review-version >> text=hidden")
    shot(page2, "review")
    page2.locator("#review-score").get_by_text("4 · good").click()
    page2.click("#review-save")
    page2.wait_for_selector("#review-status >> text=saved")
    page2.wait_for_selector("#review-question >> text=Nothing left to review")

    # -- ... and it is counted in Insights ---------------------------------------------------------
    open_tab(page2, "Insights")
    page2.wait_for_selector("#insights-summary >> text=answers recorded")
    summary = page2.inner_text("#insights-summary")
    assert re.search(r"\b1\s+answers recorded,\s+1\s+with expert ratings", summary), summary
    table = page2.inner_text("#insights-table")
    assert "v1" in table and "3" in table  # mean of 2 and 4
    shot(page2, "insights")

    # -- a clinician stops an answer half-way, and is refused the Review tab ------------------------
    page3 = sign_in(browser, app, "cara")
    assert not page3.locator("#consult-save").is_visible()  # no expert rating controls either
    upload(page3, EXAMPLE)
    page3.fill("#dl-question textarea", "Is this urgent?")
    page3.click("#dl-ask")
    page3.wait_for_function("document.querySelector('#dl-chat').innerText.includes('▌')")
    page3.click("#dl-stop")
    page3.wait_for_selector("#dl-chat >> text=stopped")
    assert app_turns(app)["status"].iloc[-1] == "stopped"
    open_tab(page3, "Review")
    page3.wait_for_selector("#review-refused >> text=access refused")
    assert not page3.locator("#review-save").is_visible()
    shot(page3, "review-refused-clinician")


def app_turns(app: App):
    from annotation_db.export import frames

    with app.store.session() as s:
        return frames(s)["turns"]


def app_answer(app: App) -> str:
    return app_turns(app)["answer"].iloc[-1]


def test_markdown_from_users_and_answers_loads_nothing_remote(browser, tiny_model_dir, tmp_path):
    """A question, context or answer with Markdown/HTML images: shown as text in Consult and Review, and
    the browser never requests them (a tracking pixel would leak when and what an expert reviews)."""
    import json

    from gradio_client import Client, handle_file

    users = tmp_path / "users.yaml"
    for name, role in (("eve", "expert"), ("cara", "clinician")):
        add_user(users, name, role, f"{name}-password", rounds=4)
    app = App(tmp_path / "home", tiny_model_dir, auth=AuthConfig.from_file(users), max_new_tokens=8)
    pixel = "http://192.0.2.7/pixel.png"
    question = f"Is it bad? ![x]({pixel}?leak=question) <img src='{pixel}?leak=html'>"
    try:
        cara_api = Client(app.url, auth=("cara", "cara-password"), verbose=False)
        cara_api.predict([handle_file(str(EXAMPLE))], question, json.dumps({"symptoms": f"![y]({pixel}?leak=context)"}),
                         "", api_name="/ask")
        seen: list[str] = []
        cara = sign_in(browser, app, "cara")
        cara.context.on("request", lambda r: seen.append(r.url))
        upload(cara, EXAMPLE)
        cara.fill("#dl-question textarea", question)
        cara.click("#dl-ask")
        cara.wait_for_selector("#dl-chat >> text=model v1")
        assert f"![x]({pixel}?leak=question)" in cara.inner_text("#dl-chat")  # shown as typed

        eve = sign_in(browser, app, "eve")
        eve.context.on("request", lambda r: seen.append(r.url))
        open_tab(eve, "Review")
        eve.wait_for_selector("#review-question >> text=pixel.png")
        assert f"<img src='{pixel}?leak=html'>" in eve.inner_text("#review-question")
        assert "leak=context" in eve.inner_text("#review-context")
        eve.wait_for_timeout(1000)  # give any image a chance to start loading
        assert not [u for u in seen if "192.0.2.7" in u], seen
    finally:
        PAGES.clear()
        app.close()
