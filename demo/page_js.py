"""The app's page script: the Review tab's keys (`demo.keys`), paste-to-upload and zoom on click in
Consult. Passed once as `launch(js=PAGE_JS)` by `demo.app.launch_kwargs`; tested in Chromium
(tests/test_browser_consult.py, tests/test_browser_review.py).

- Paste: an image pasted anywhere on the Consult tab (a screenshot, an image copied from a viewer)
  is handed to the image box's own file input, exactly as if it had been chosen in the file dialog,
  so the same server-side clean-up (metadata stripped, neutral name, size limits) applies. Gradio's
  gr.File takes no paste itself; gr.Image takes one image, not several.
- Zoom: clicking an image in the conversation shows it enlarged over the page (Gradio 6.31's chatbot
  has no preview of its own); a click or Esc closes it.
"""

from demo.keys import KEYS_JS

PASTE_JS = r"""
() => {
  if (window.__dermaloopPaste) return;
  window.__dermaloopPaste = true;
  document.addEventListener("paste", (ev) => {
    const box = document.querySelector("#dl-images");
    const input = box && box.querySelector("input[type=file]");
    if (!input || box.offsetParent === null || !ev.clipboardData) return;  // not on the Consult tab
    const images = [...ev.clipboardData.files].filter((f) => f.type.startsWith("image/"));
    if (!images.length) return;  // text pastes as usual
    const dt = new DataTransfer();
    // A clipboard image is usually called "image.png"; the server renames every upload after its pixels anyway.
    images.forEach((f, i) => dt.items.add(new File([f], f.name || `pasted-${i + 1}.png`, {type: f.type})));
    input.files = dt.files;
    input.dispatchEvent(new Event("change", {bubbles: true}));
    if (!ev.clipboardData.getData("text/plain")) ev.preventDefault();
  });
}
"""

ZOOM_JS = r"""
() => {
  if (window.__dermaloopZoom) return;
  window.__dermaloopZoom = true;
  const close = () => { const o = document.getElementById("dl-zoom"); if (o) o.remove(); };
  document.addEventListener("click", (ev) => {
    if (document.getElementById("dl-zoom")) { close(); return; }
    const img = ev.target instanceof Element ? ev.target.closest("#dl-chat img") : null;
    if (!img || !img.currentSrc) return;
    const overlay = document.createElement("div");
    overlay.id = "dl-zoom";
    overlay.setAttribute("role", "dialog");
    overlay.setAttribute("aria-modal", "true");
    overlay.setAttribute("aria-label", "Image, enlarged: click or press Esc to close");
    overlay.title = "Click or press Esc to close";
    const big = document.createElement("img");
    big.src = img.currentSrc;
    big.alt = img.alt || "image";
    overlay.appendChild(big);
    document.body.appendChild(overlay);
    ev.preventDefault();
    ev.stopPropagation();
  }, true);
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") close(); });
}
"""

ZOOM_CSS = """
#dl-chat img {cursor: zoom-in;}
#dl-zoom {position: fixed; inset: 0; z-index: 1000; display: flex; align-items: center; justify-content: center;
          background: rgba(0, 0, 0, .85); cursor: zoom-out;}
#dl-zoom img {max-width: 95vw; max-height: 95vh; min-width: min(60vmin, 95vw); object-fit: contain;
              image-rendering: auto; background: #fff;}
"""

PAGE_JS = f"""
() => {{
  ({KEYS_JS.strip()})();
  ({PASTE_JS.strip()})();
  ({ZOOM_JS.strip()})();
}}
"""
