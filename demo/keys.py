"""The Review tab's keyboard path, as page script (`launch(js=KEYS_JS)` via `demo.app.launch_kwargs`).

Rating: 1-5 choose the score, Enter saves and shows the next answer, S skips, E puts the cursor
in the correction, Esc leaves a text field. Comparing two answers (`demo.pairwise`): A, B and T
judge (A better, B better, tie), E puts the cursor in the correction, S skips, Enter or N shows
the next pair once the versions are revealed. Nothing fires while a person types in a
text field (input, textarea, select, contenteditable), with a modifier key held, or
when the Review panel is not on screen. The keys click the same buttons a mouse
would, so the server-side checks are the same. Tested in Chromium (tests/test_browser_review.py).
"""

KEYS_JS = r"""
() => {
  if (window.__dermaloopKeys) return;
  window.__dermaloopKeys = true;
  const visible = (el) => !!el && el.offsetParent !== null;
  const typing = (el) => !!el && (el.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(el.tagName))
    && !(el.tagName === "INPUT" && ["radio", "checkbox", "button", "submit"].includes(el.type));
  document.addEventListener("keydown", (ev) => {
    const t = ev.target;
    if (ev.key === "Escape" && typing(t)) { t.blur(); return; }
    if (ev.ctrlKey || ev.metaKey || ev.altKey || ev.isComposing || typing(t)) return;
    const key = ev.key.toLowerCase();
    const click = (sel) => { const el = document.querySelector(sel); if (visible(el)) { el.click(); ev.preventDefault(); } };
    if (visible(document.querySelector("#pair-panel"))) {
      const pairKeys = {a: "#pair-a", b: "#pair-b", t: "#pair-tie", s: "#pair-skip", enter: "#pair-next", n: "#pair-next"};
      if (pairKeys[key]) click(pairKeys[key]);
      else if (key === "e") {
        const box = document.querySelector("#pair-correction textarea");
        if (box && visible(document.querySelector("#pair-a"))) { box.focus(); ev.preventDefault(); }
      }
      return;
    }
    const save = document.querySelector("#review-save");
    if (!visible(save)) return;
    if (key >= "1" && key <= "5") {
      const radios = document.querySelectorAll("#review-score input[type=radio]");
      const r = radios[Number(key) - 1];
      if (r) { r.click(); ev.preventDefault(); }
    } else if (key === "enter") {
      save.click(); ev.preventDefault();
    } else if (key === "s") {
      const skip = document.querySelector("#review-skip");
      if (visible(skip)) { skip.click(); ev.preventDefault(); }
    } else if (key === "e") {
      const box = document.querySelector("#review-correction textarea");
      if (box) { box.focus(); ev.preventDefault(); }
    }
  });
}
"""
