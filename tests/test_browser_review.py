"""Review by keyboard in a real browser (Chromium via Playwright), and an admin's erasure.

1-5 score, Enter saves and shows the next, S skips, E edits the correction, none of
them while typing; the legend is on screen; an admin erases a conversation from the
Review tab. Screenshots go to test-artifacts/.

    python -m pytest -q tests/test_browser_review.py
"""

from __future__ import annotations

import pytest
from gradio_client import Client, handle_file
from test_browser import EXAMPLE, open_tab, shot, shots_on_failure, sign_in

from annotation_db import store as st
from demo.auth import AuthConfig, add_user

from conftest import CHROMIUM
from test_api import App

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium)"),
]


def test_review_by_keyboard_and_erase_as_admin(browser, tiny_model_dir, tmp_path):
    users = tmp_path / "users.yaml"
    for name, role in (("max", "expert"), ("cara", "clinician"), ("ada", "admin")):
        add_user(users, name, role, f"{name}-password", rounds=4)
    app = App(tmp_path / "home", tiny_model_dir, auth=AuthConfig.from_file(users), max_new_tokens=6)
    with shots_on_failure(app, "review"):
        cara = Client(app.url, auth=("cara", "cara-password"), verbose=False)
        for i in range(3):
            cara.predict([handle_file(str(EXAMPLE))], f"Question {i}?", "", "", api_name="/ask")
        page = sign_in(browser, app, "max")
        open_tab(page, "Review")
        page.wait_for_selector("#review-question >> text=Question 0?")
        assert "Enter" in page.inner_text("#review-keys") and "skip" in page.inner_text("#review-keys")
        # typing in a text field fires nothing: "4", "s" and Enter go into the comment
        page.click("#review-comment textarea, #review-comment input")
        page.keyboard.type("4 s")
        page.keyboard.press("Enter")
        assert "Question 0?" in page.inner_text("#review-question")
        assert not page.locator("#review-score input[type=radio]:checked").count()
        page.keyboard.press("Escape")
        page.keyboard.press("4")  # out of the field: a score
        assert page.locator("#review-score input[type=radio]:checked").get_attribute("value") in ("4", None)
        assert page.locator("#review-score input[type=radio]").nth(3).is_checked()
        page.keyboard.press("e")  # the cursor goes to the correction, and no "e" is typed into it
        assert page.evaluate("document.activeElement === document.querySelector('#review-correction textarea')")
        before = page.input_value("#review-correction textarea")
        page.keyboard.type(" Refer.")
        assert page.input_value("#review-correction textarea") == before + " Refer."
        page.keyboard.press("Escape")
        shot(page, "review-keyboard")
        page.keyboard.press("Enter")  # save and go on
        page.wait_for_selector("#review-question >> text=Question 1?")
        page.keyboard.press("s")  # skip
        page.wait_for_selector("#review-question >> text=Question 2?")
        assert "1 skipped" in page.inner_text("#review-counter")
        with app.store.session() as s:
            ratings = [r for t in (1, 2, 3) for r in st.effective_ratings(s, t)]
        assert [(r.turn_id, r.score, r.comment, r.correction.endswith(" Refer.")) for r in ratings] == [(1, 4, "4 s", True)]

        # an admin erases the first conversation from the Review tab
        admin = sign_in(browser, app, "ada")
        open_tab(admin, "Review")
        admin.get_by_text("Erase a conversation (admins)").click()
        admin.fill("#erase-conversation input", "1")
        admin.fill("#erase-reason textarea, #erase-reason input", "consent withdrawn")
        admin.click("#erase-button")
        admin.wait_for_selector(".toast-body >> text=confirm", timeout=15_000)
        admin.locator("#erase-confirm input").check()
        admin.click("#erase-button")
        admin.wait_for_selector("#erase-status >> text=Conversation 1 erased")
        assert "consent withdrawn" in admin.inner_text("#erase-table")
        shot(admin, "review-erase")
        with app.store.session() as s:
            assert st.list_erasures(s)[0].conversation_id == 1
