"""The offline demonstration model: a demo, never production.

    from training.demo_model import ensure_demo_model, in_demo_mode
    demo = ensure_demo_model(settings)      # DemoModel(base_dir, version, adapter_dir, settings)

The demo lives apart from the production store: its own data directory and SQLite
database under `<home>/offline-demo/` (`demo_settings`). The app enters it when asked
(`--offline-demo`, DERMALOOP_OFFLINE_DEMO=1) or when the configured model cannot be
loaded and the production store has no model versions at all; `in_demo_mode` tells
`python -m training.refine` (same `--home`) to train the demo's model on the demo's
ratings then, with the lesion phantoms as synthetic data. A store that has versions
never falls back: the app stops with a message instead.

With `<home>/offline-demo/models/offline-base` and an active version in the demo's
store, `ensure_demo_model` returns at once. Otherwise it builds one (about a minute
on 2 CPU cores):

1. a tiny SmolVLM-architecture model (`core.tiny`), its tokenizer trained on the
   phantom question/answer texts and the system instruction (short sequences);
2. a vision warm-up: the tiny random vision tower and connector are trained for a
   few seconds to tell the phantom classes apart (a linear probe on the max-pooled
   image tokens), the stand-in for the pretrained vision encoder every real VLM
   has; a 2-layer random ViT otherwise needs far longer than the time budget;
3. the refine pipeline itself (`training.refine.run.run_refine`): LoRA on the language
   model on lesion phantoms (diagnosis, description and next-step questions),
   the gate on held-out phantoms, registration as the active version with a model
   card that says this is an offline demonstration model with no clinical meaning.

The base directory is written under a temp name and renamed, and registration is
one transaction, so a killed build leaves nothing half-made; the next call reuses
a complete base directory and trains again.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.config import Settings

DEMO_DIR = "offline-demo"  # under the data directory
BASE_NAME = "offline-base"
N_TRAIN = 300  # phantoms per class cycle: 50 per class
N_HELDOUT = 60
IMAGE_SIZE = 64  # the tiny model's image size; phantoms are drawn at it


@dataclass(frozen=True)
class DemoModel:
    base_dir: Path  # the tiny base model (processor included)
    version: str  # the store version to use (active)
    adapter_dir: Path | None  # its LoRA adapter
    settings: Settings  # the demo's own settings (data directory, database, model)


def demo_settings(settings: Settings) -> Settings:
    """The demo's settings: `<home>/offline-demo/` with its own SQLite store, the tiny base as the model."""
    if settings.offline_demo and settings.home.name == DEMO_DIR:
        return settings  # already the demo's
    home = settings.home / DEMO_DIR
    return settings.replace(home=home, db="", model=str((home / "models" / BASE_NAME).resolve()), offline_demo=True)


def in_demo_mode(settings: Settings) -> bool:
    """Whether commands on `settings` act on the offline demo: asked for, or the demo exists and the
    production store has no model versions at all."""
    from annotation_db import store as st
    from annotation_db.db import Store

    if settings.offline_demo:
        return True
    if not (settings.home / DEMO_DIR / "annotations.db").exists():
        return False
    db = Store.open(settings.db_url)
    try:
        with db.session() as s:
            return not st.list_versions(s)
    finally:
        db.dispose()


def phantom_data(settings: Settings) -> tuple[Path, Path]:
    """(train, held-out) phantom JSONL files of the demo: its synthetic data and its gate's eval set."""
    base = Path(demo_settings(settings).model) / "phantoms"
    return base / "train.jsonl", base / "heldout.jsonl"


def demo_refine_config():
    """The refine settings of the demo build (see `training.refine.run.RefineConfig`)."""
    from training.refine.run import RefineConfig

    return RefineConfig(
        synthetic_ratio=1.0, supervision="qa", min_new=0, gold_holdout=0.0, lora_r=16, lora_alpha=32, lora_dropout=0.0,
        steps=450, batch_size=16, learning_rate=5e-3, warmup_ratio=0.05, save_steps=100, eval_max_new_tokens=12,
        eval_batch_size=30, eval_metrics="rouge,diagnosis,repetition", max_repetition=1.0, tolerance=1.0,
    )


def ensure_demo_model(settings: Settings, *, progress: Callable[[str], None] = print) -> DemoModel:
    """The offline demo model, built and registered in the demo's own store if it is not there yet."""
    from annotation_db import store as st
    from annotation_db.db import Store

    settings = demo_settings(settings)
    base_dir = Path(settings.model)
    db = Store.open(settings.db_url)
    try:
        with db.session() as s:
            active = st.active_version(s)
            if active is not None and (base_dir / "config.json").exists():
                adapter = Path(active.adapter_path) if active.adapter_path else None
                return DemoModel(base_dir, active.name, adapter, settings)
    finally:
        db.dispose()
    return build_demo_model(settings, progress=progress)


def build_demo_model(settings: Settings, *, progress: Callable[[str], None] = print, cfg=None) -> DemoModel:
    from training.refine.run import run_refine

    t0 = time.perf_counter()
    settings = demo_settings(settings)
    base_dir = Path(settings.model)
    if not (base_dir / "config.json").exists():
        progress("offline demo model: building a tiny vision-language model and lesion phantoms…")
        _build_base(base_dir)
    progress(f"offline demo model: training on lesion phantoms (about a minute)… base ready after {time.perf_counter() - t0:.0f} s")
    cfg = cfg or demo_refine_config()
    train, heldout = phantom_data(settings)
    cfg.synthetic, cfg.synthetic_eval = [str(train)], [str(heldout)]
    outcome = run_refine(settings.replace(device="cpu" if settings.device == "auto" else settings.device),
                         cfg, progress=False, explicit_model=True, out=lambda m: None)
    if outcome.status != "promoted":
        from training.errors import TrainingError

        raise TrainingError(f"the offline demo model could not be built: {outcome.summary}")
    acc = outcome.report["metrics_candidate"].get("diagnosis_accuracy")
    progress(f"offline demo model {outcome.version} ready in {time.perf_counter() - t0:.0f} s "
             f"(held-out phantom diagnosis accuracy {acc:.2f})")
    return DemoModel(base_dir, outcome.version, settings.models_dir / outcome.version, settings)


def phantom_texts() -> list[str]:
    """Texts for the tokenizer: every phantom question and answer form, captions, the system instruction."""
    from core.prompts import SAFETY_INSTRUCTION
    from training.data.phantoms import generate

    texts = [SAFETY_INSTRUCTION, "Describe the lesion in the image."]
    for ph in generate(30, 12345, "train", size=32):
        texts += [q for _, q, _ in ph.qa()] + [a for _, _, a in ph.qa()] + [ph.caption()]
    return texts


def _build_base(base_dir: Path) -> None:
    from core.tiny import build_tiny_model
    from training.data.phantoms import write_phantoms

    base_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = base_dir.parent / f".{BASE_NAME}-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_tiny_model(tmp, family="smolvlm", seed=0, extra_texts=phantom_texts(), image_size=IMAGE_SIZE)
        write_phantoms(tmp / "phantoms", N_TRAIN, seed=0, split="train", size=IMAGE_SIZE)
        write_phantoms(tmp / "phantoms", N_HELDOUT, seed=0, split="heldout", kinds=("diagnosis",), size=IMAGE_SIZE)
        warm_up_vision(tmp)
        shutil.rmtree(base_dir, ignore_errors=True)
        os.replace(tmp, base_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def warm_up_vision(model_dir: Path, *, steps: int = 150, lr: float = 1e-2, batch: int = 32, seed: int = 0) -> float:
    """Train the vision tower + connector of the model in `model_dir` to separate the phantom classes.

    A linear head on the max over image tokens (the language model later reads the
    class from those tokens through attention). Saves the model in place; returns
    the probe's accuracy on held-out phantoms.
    """
    import torch

    from core.models import load_model
    from training.data.phantoms import CLASSES, generate

    torch.manual_seed(seed)
    loaded = load_model(model_dir, device="cpu", dtype="float32", image_splitting="off")
    model, processor = loaded.model, loaded.processor
    train = generate(N_TRAIN, seed, "train", size=IMAGE_SIZE)
    held = generate(N_HELDOUT, seed, "heldout", size=IMAGE_SIZE)
    names = [c.name for c in CLASSES]

    def pixels(phs):
        x = processor.image_processor([[p.image] for p in phs], return_tensors="pt")
        return x["pixel_values"], x["pixel_attention_mask"], torch.tensor([names.index(p.label) for p in phs])

    xt, mt, yt = pixels(train)
    xh, mh, yh = pixels(held)
    inner = model.model
    head = torch.nn.Linear(model.config.text_config.hidden_size, len(names))
    params = [*inner.vision_model.parameters(), *inner.connector.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr)

    def pooled(x, m):
        f = inner.get_image_features(pixel_values=x, pixel_attention_mask=m)
        f = getattr(f, "pooler_output", f)
        if isinstance(f, (list, tuple)):
            f = torch.cat([t if t.dim() == 3 else t[None] for t in f])
        return f.max(dim=1).values + f.mean(dim=1)

    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(train), (batch,), generator=g)
        loss = torch.nn.functional.cross_entropy(head(pooled(xt[idx], mt[idx])), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((head(pooled(xh, mh)).argmax(1) == yh).float().mean())
    model.save_pretrained(model_dir)
    return acc
