"""Hugging Face Spaces: persistent storage, the model cache, ZeroGPU.

`prepare()` runs first in `app.py` (and `python -m demo`), before anything imports
torch: on a Space it points DERMALOOP_HOME at `/data/dermaloop` and HF_HOME at
`/data/.huggingface` when persistent storage is mounted (else it returns a warning
for every page: ratings would be lost on restart), and on ZeroGPU hardware it
imports `spaces` so that generation can run inside `spaces.GPU`. Elsewhere it does
nothing.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

NO_PERSISTENCE = (
    "**No persistent storage.** This Space has no `/data` volume, so questions, ratings and model versions "
    "are lost when it restarts. Add persistent storage in the Space's settings."
)


@dataclass
class SpaceInfo:
    on_space: bool = False
    zerogpu: bool = False
    persistent: bool = False
    notices: list[str] = field(default_factory=list)


def on_space(environ: dict | None = None) -> bool:
    return bool((environ if environ is not None else os.environ).get("SPACE_ID"))


def prepare(environ: dict | None = None, data_root: str | Path = "/data") -> SpaceInfo:
    """Set up the environment for a Space (idempotent; a no-op elsewhere)."""
    env = os.environ if environ is None else environ
    if not on_space(env):
        return SpaceInfo()
    info = SpaceInfo(on_space=True)
    root = Path(data_root)
    if root.is_dir() and os.access(root, os.W_OK):
        info.persistent = True
        env.setdefault("DERMALOOP_HOME", str(root / "dermaloop"))
        env.setdefault("HF_HOME", str(root / ".huggingface"))
    else:
        info.notices.append(NO_PERSISTENCE)
    # ZeroGPU sets SPACES_ZERO_GPU; `spaces` must be imported before torch initialises CUDA.
    if env.get("SPACES_ZERO_GPU") and importlib.util.find_spec("spaces") is not None:
        import spaces  # noqa: F401

        info.zerogpu = True
    return info
