"""Shared test setup: offline, isolated, with tiny models built in-process.

- Every socket connection outside loopback fails loudly (a test that tries to reach
  the hub, a metric hub or anything else on the internet errors at once).
- HF_HUB_OFFLINE=1 and GRADIO_ANALYTICS_ENABLED=False for this process and its children.
- DERMALOOP_HOME points at a fresh temp folder in every test.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


class NetworkBlocked(RuntimeError):
    pass


def _check(address) -> None:
    if isinstance(address, (str, bytes)):  # AF_UNIX
        return
    host = address[0]
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        if host in ("localhost",):
            return
    raise NetworkBlocked(f"tests must not reach the network: connection to {address!r} blocked")


def _guarded_connect(self, address):
    _check(address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    _check(address)
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex


@pytest.fixture(autouse=True)
def dermaloop_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dermaloop-home"
    monkeypatch.setenv("DERMALOOP_HOME", str(home))
    for name in ("DERMALOOP_DB", "DERMALOOP_MODEL", "DERMALOOP_DEVICE", "DERMALOOP_AUTH_FILE"):
        monkeypatch.delenv(name, raising=False)
    return home


PG_URL = os.environ.get("DERMALOOP_TEST_PG_URL")
PG_SKIP = "PostgreSQL store tests skipped: DERMALOOP_TEST_PG_URL is unset (source .ci/postgres.sh)"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(not PG_URL, reason=PG_SKIP))])
def url(request, tmp_path):
    """A fresh database URL: SQLite in a temp folder, and PostgreSQL when CI provides one."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'annotations.db'}"
    reset_pg(PG_URL)
    return PG_URL


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SmolVLM-architecture model + processor saved offline (built once)."""
    from core.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-smolvlm"), family="smolvlm", seed=0)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny replica of llava-hf/llava-1.5-7b-hf: its config (shrunk), processor, chat template and special tokens."""
    from core.replicas import build_replica

    return build_replica("llava15", tmp_path_factory.mktemp("tiny-llava"), seed=0)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter for the tiny model (random B, so its answers differ from the base's)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from core.models import load_model

    model = load_model(tiny_model_dir).model
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


@pytest.fixture
def tiny_engine(tiny_model_dir: Path):
    """A fresh engine on the tiny model (loading takes well under a second)."""
    from core.config import Settings
    from core.engine import Engine
    from core.models import load_model

    return Engine(load_model(tiny_model_dir), Settings.from_env(max_new_tokens=16))


def draw_lesion(size=(96, 80), colour=(120, 60, 40), background=(225, 190, 160)):
    """A simple drawn lesion: an ellipse on a skin tone (tests draw their own images)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, background)
    w, h = size
    ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=colour)
    return img


# ------------------------------------------------------------------------------ the store on SQLite and PostgreSQL


def reset_pg(url: str) -> None:
    from annotation_db.db import make_engine

    engine = make_engine(url)
    with engine.begin() as c:
        c.exec_driver_sql("DROP SCHEMA public CASCADE")
        c.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()


@pytest.fixture
def db(url):
    """A fresh, migrated store on SQLite, and on PostgreSQL when CI provides one."""
    from annotation_db import Store

    st = Store.open(url)
    yield st
    st.dispose()


def h(i: int) -> str:
    """A fake image hash."""
    return hashlib.sha256(f"img{i}".encode()).hexdigest()


@pytest.fixture
def world(db):
    """A clinician, two experts, a base version, a conversation with two turns."""
    from annotation_db import store

    with db.session() as s:
        doc = store.get_or_create_user(s, "dr-clinic", "clinician")
        e1 = store.get_or_create_user(s, "expert-1")
        e2 = store.get_or_create_user(s, "expert-2")
        v1 = store.ensure_base_version(s, "HuggingFaceTB/SmolVLM-256M-Instruct")
        for i in range(3):
            store.record_image(s, h(i), 64, 48, nbytes=100)
        c = store.start_conversation(s, doc.id, {"age": 54, "site": "back", "fitzpatrick": "III"})
        t1 = store.record_turn(s, c.id, "What is this lesion?", "A seborrhoeic keratosis.",
                               image_hashes=[h(0), h(1)], template="qa-v1", settings={"max_new_tokens": 64},
                               model_version_id=v1.id, latency_s=1.5, ttft_s=0.2, prompt_tokens=90,
                               completion_tokens=12)
        t2 = store.record_turn(s, c.id, "And this one?", "A nevus.", image_hashes=[h(2)], template="qa-v1",
                               settings={}, model_version_id=v1.id)
    return dict(db=db, doc=doc.id, e1=e1.id, e2=e2.id, v1=v1.id, conv=c.id, t1=t1.id, t2=t2.id)


# ---------------------------------------------------------------- the app's handlers, called directly

USERS = {"eve": "expert", "max": "expert", "cara": "clinician", "ada": "admin"}


def req(name: str | None = None, session: str = "s1"):
    return SimpleNamespace(username=name, session_hash=session)


@pytest.fixture
def settings(tiny_model_dir: Path):
    """The app's settings on the tiny model (short answers)."""
    from core.config import Settings

    return Settings.from_env(model=str(tiny_model_dir), max_new_tokens=8)


@pytest.fixture
def store(settings):
    from annotation_db.db import Store

    s = Store.open(settings.db_url)
    yield s
    s.dispose()


@pytest.fixture
def ctx(settings, tiny_engine, store):
    """The app's context (runtime, logins of USERS, options) for calling handlers directly."""
    from demo.auth import AuthConfig, UserEntry
    from demo.common import Ctx
    from demo.runtime import DemoOptions, attach

    auth = AuthConfig(mode="password", users={n: UserEntry(r, "$2b$04$x") for n, r in USERS.items()})
    options = DemoOptions(review_need=2, poll_s=0)
    return Ctx(attach(settings, tiny_engine, store, options), auth, options)


def save_png(path: Path, img=None) -> str:
    (img or draw_lesion()).save(path)
    return str(path)


def ask(consult, case, files, question: str, who: str = "eve", session: str = "s1", **context):
    form = {"case": case, "files": files, "question": question, "template": context.pop("template", "free"), **context}
    outs = list(consult.ask(form, req(who, session)))
    return outs


def counts(store) -> dict[str, int]:
    from annotation_db.export import frames

    with store.session() as s:
        f = frames(s)
    return {"turns": len(f["turns"]), "ratings": len(f["ratings"])}


# ---------------------------------------------------------------- a real browser (Debian's Chromium, never a downloaded one)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()
