"""Blind pairwise review in a real browser (Chromium via Playwright): the Review tab's "Compare two
answers" mode, A and B side by side without version names, judged by keyboard (A, B, T; nothing
while typing the correction), the versions revealed, Enter for the next pair; then the Insights tab
shows version against version. Screenshots go to test-artifacts/.

    python -m pytest -q tests/test_browser_pairwise.py
"""

from __future__ import annotations

import pytest
from gradio_client import Client, handle_file
from test_browser import EXAMPLE, open_tab, shot, shots_on_failure, sign_in

from annotation_db import pairwise as pw
from annotation_db import store as st
from demo.auth import AuthConfig, add_user

from conftest import CHROMIUM
from test_api import App

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium)"),
]


def test_compare_two_answers_by_keyboard(browser, tiny_model_dir, tmp_path):
    users = tmp_path / "users.yaml"
    for name, role in (("max", "expert"), ("cara", "clinician")):
        add_user(users, name, role, f"{name}-password", rounds=4)
    app = App(tmp_path / "home", tiny_model_dir, auth=AuthConfig.from_file(users), max_new_tokens=6)
    with shots_on_failure(app, "pairwise"):
        cara = Client(app.url, auth=("cara", "cara-password"), verbose=False)
        cara.predict([handle_file(str(EXAMPLE))], "Which lesion is this?", "", "", api_name="/ask")
        with app.store.session() as s:
            v2 = st.register_version(s, base_model="b", adapter_path="models/v2")
            turn = st.conversation_history(s, 1)[0]
            pw.add_pairwise_cases(s, [
                pw.CaseIn("Which lesion is this?", "CANDIDATE-ONE answer.", "ACTIVE-ONE answer.", turn.image_hashes,
                          {"age": 67, "body_site": "upper back"}, turn_id=turn.turn_id),
                pw.CaseIn("Second case?", "CANDIDATE-TWO answer.", "ACTIVE-TWO answer."),
            ], candidate=v2.id, active="v1", batch="refine-browser")

        page = sign_in(browser, app, "max")
        open_tab(page, "Review")
        page.get_by_text("Compare two answers").click()
        page.wait_for_selector("#pair-question >> text=Which lesion is this?")
        assert "Upper back" in page.inner_text("#pair-context") or "upper back" in page.inner_text("#pair-context")
        page.wait_for_selector("#pair-images img")
        a_text, b_text = page.inner_text("#pair-answer-a"), page.inner_text("#pair-answer-b")
        assert {a_text.strip(), b_text.strip()} == {"CANDIDATE-ONE answer.", "ACTIVE-ONE answer."}
        assert "v2" not in page.inner_text("#pair-panel") and "v1" not in page.inner_text("#pair-panel")
        assert "B better" in page.inner_text("#pair-keys")
        shot(page, "pairwise-blind")

        page.click("#pair-correction textarea")  # typing fires no key: "a b t" goes into the correction
        page.keyboard.type("a b t")
        page.keyboard.press("Escape")
        assert page.input_value("#pair-correction textarea") == "a b t" and page.locator("#pair-a").is_visible()
        page.keyboard.press("b")  # B better
        page.wait_for_selector("#pair-head-b >> text=✅")
        head_b = page.inner_text("#pair-head-b")
        b_is_candidate = b_text.strip().startswith("CANDIDATE")
        assert ("v2 (candidate)" if b_is_candidate else "v1 (active)") in head_b
        assert "A was" in page.inner_text("#pair-status") and not page.locator("#pair-a").is_visible()
        shot(page, "pairwise-revealed")
        page.keyboard.press("Enter")  # the next pair
        page.wait_for_selector("#pair-question >> text=Second case?")
        page.keyboard.press("t")  # a tie
        page.wait_for_selector("#pair-head-a >> text=🤝")
        with app.store.session() as s:
            x = pw.pairwise_summary(s, batch="refine-browser")[0]
            assert (x.wins, x.losses, x.ties) == ((1, 0, 1) if b_is_candidate else (0, 1, 1))
            assert [p.chosen for p in pw.pairwise_preference_pairs(s, corrections_only=True)] == ["a b t", "a b t"]

        open_tab(page, "Insights")
        page.wait_for_selector("#insights-pairwise >> text=experts preferred")
        words = page.inner_text("#insights-pairwise")
        assert "v2 vs v1" in words and "(1 tie)" in words and "95 % interval" in words
        assert "0.00 to" in page.inner_text("#insights-pairwise-table") or "to 1.00" in page.inner_text("#insights-pairwise-table")
        assert "No refine run folders yet" in page.inner_text("#insights-run-note")
        shot(page, "pairwise-insights")
