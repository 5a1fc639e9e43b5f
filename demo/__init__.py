"""DermaLoop's Gradio app: Consult (clinicians), Review (experts), Insights; its API; Spaces entry.

    python -m demo                        # http://127.0.0.1:7860, local single-user mode
    python -m demo --auth-file users.yaml # logins with roles (clinician / expert / admin)

Modules: `runtime` (start-up: store, model, offline fallback, hot version swap),
`auth` (who is asking and with which role), `consult` / `review` / `insights`
(plain handler functions), `app` (`build_demo(...) -> gr.Blocks`: the wiring),
`spaces` (Hugging Face Spaces: /data, ZeroGPU). No model code and no SQL here:
everything goes through `core` and `annotation_db`.
"""

from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"  # drawn phantoms shown as example cases
