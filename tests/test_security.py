"""Hostile and careless users (issue: login floods, oversized fields, strict API types, files)."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from demo.auth import AuthConfig, add_user
from demo.security import UPLOAD_MAX_AGE_S, LoginGuard, LoginPolicy, Throttle, sweep_uploads

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_repeated_failures_lock_a_key_with_doubling_back_off():
    clock = Clock()
    throttle = Throttle(LoginPolicy(max_failures=3, lock_s=10, max_lock_s=25), "user", clock)
    for _ in range(2):
        throttle.failed("eve")
    assert throttle.locked("eve") == 0
    throttle.failed("eve")
    assert throttle.locked("eve") == 10 and throttle.locked("cara") == 0
    clock.now += 10
    assert throttle.locked("eve") == 0
    for _ in range(3):
        throttle.failed("eve")
    assert throttle.locked("eve") == 20  # the second lock doubles
    clock.now += 20
    for _ in range(3):
        throttle.failed("eve")
    assert throttle.locked("eve") == 25  # capped
    throttle.succeeded("eve")
    assert throttle.locked("eve") == 0


def test_failures_outside_the_window_do_not_add_up():
    clock = Clock()
    throttle = Throttle(LoginPolicy(max_failures=3, window_s=60), "user", clock)
    for _ in range(5):
        throttle.failed("eve")
        clock.now += 31  # never 3 within 60 s
    assert throttle.locked("eve") == 0


@pytest.fixture
def users(tmp_path):
    path = tmp_path / "users.yaml"
    add_user(path, "eve", "expert", "eve-pw", rounds=4)
    add_user(path, "cara", "clinician", "cara-pw", rounds=4)
    add_user(path, "max", "expert", "max-pw", rounds=4)
    return AuthConfig.from_file(path)


def test_logins_hash_off_the_event_loop_and_unknown_names_cost_a_hash_too(users, monkeypatch):
    import bcrypt

    guard = LoginGuard(users)
    threads, hashed = [], []
    real = bcrypt.checkpw

    def spy(password, hashed_pw):
        threads.append(threading.current_thread())
        hashed.append(hashed_pw)
        return real(password, hashed_pw)

    monkeypatch.setattr(bcrypt, "checkpw", spy)

    async def attempts():
        loop_thread = threading.current_thread()
        results = [await guard.check("eve", "eve-pw"), await guard.check("eve", "wrong"),
                   await guard.check("mallory", "eve-pw")]
        return loop_thread, results

    loop_thread, results = asyncio.run(attempts())
    assert results == [True, False, False]
    assert len(threads) == 3 and loop_thread not in threads  # bcrypt never ran on the event loop
    assert hashed[2].startswith(b"$2b$04$")  # the unknown name was checked against a dummy of the same cost


def test_a_locked_user_is_refused_without_hashing(users, monkeypatch):
    import bcrypt

    guard = LoginGuard(users, LoginPolicy(max_failures=2, lock_s=60))

    async def attempts():
        return [await guard.check("eve", "no"), await guard.check("eve", "no"), await guard.check("eve", "eve-pw")]

    calls = []
    real = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda p, h: calls.append(1) or real(p, h))
    assert asyncio.run(attempts()) == [False, False, False]  # even the right password waits out the lock
    assert len(calls) == 2


def test_a_login_flood_from_one_address_is_refused_and_the_app_keeps_answering(users, tiny_model_dir, tmp_path):
    from test_api import App

    app = App(tmp_path / "home", tiny_model_dir, auth=users)
    try:
        codes = []

        def flood():
            with httpx.Client(base_url=app.url, timeout=30) as c:
                for _ in range(6):
                    codes.append(c.post("login", data={"username": "eve", "password": "guess"}).status_code)

        workers = [threading.Thread(target=flood) for _ in range(4)]
        [w.start() for w in workers]
        [w.join() for w in workers]
        assert codes.count(400) >= 5 and 429 in codes, codes  # back-off: later tries never reach bcrypt
        refused = httpx.post(app.url + "login", data={"username": "eve", "password": "eve-pw"})
        assert refused.status_code == 429 and "try again" in refused.json()["detail"]
        assert httpx.get(app.url + "config", timeout=10).status_code in (200, 401)  # the app still serves
    finally:
        app.close()


def test_the_users_file_is_private_and_passwords_can_come_from_stdin(tmp_path):
    path = tmp_path / "users.yaml"
    out = subprocess.run([sys.executable, "-m", "demo.auth", "add", str(path), "eve", "expert", "--password-stdin"],
                         input="s3cret\n", capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert LoginGuard(AuthConfig.from_file(path)).verify("eve", "s3cret")
    empty = subprocess.run([sys.executable, "-m", "demo.auth", "add", str(path), "cara", "clinician", "--password-stdin"],
                           input="", capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert empty.returncode == 2 and "empty" in empty.stderr and "cara" not in path.read_text()


# ------------------------------------------------------------------------------ sizes and types at the edge


@pytest.fixture
def api_app(tiny_model_dir, tmp_path):
    from test_api import App

    app = App(tmp_path / "home", tiny_model_dir)
    yield app
    app.close()


def counts(app) -> tuple[int, int]:
    from annotation_db.export import frames

    with app.store.session() as s:
        f = frames(s)
    return len(f["turns"]), len(f["ratings"])


def test_oversized_context_fields_and_ratings_are_refused_with_a_message(api_app, tmp_path):
    import json

    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from conftest import draw_lesion

    draw_lesion().save(tmp_path / "a.png")
    client = Client(api_app.url, verbose=False)
    for field, size in (("body_site", 201), ("symptoms", 2001), ("duration", 128_000), ("sex", 2_000_000)):
        with pytest.raises(AppError, match=f"{field.replace('_', ' ')} is {size} characters long; the limit is"):
            client.predict([handle_file(str(tmp_path / "a.png"))], "What is it?", json.dumps({field: "x" * size}), "",
                           api_name="/ask")
    assert counts(api_app) == (0, 0)
    _, _, turn_id, _ = client.predict([handle_file(str(tmp_path / "a.png"))], "What is it?", "", "", api_name="/ask")
    for kwargs, match in (({"correction": "x" * 8001}, "correction is 8001 characters long"),
                          ({"comment": "y" * 5_000_000}, "comment is 5000000 characters long")):
        args = [turn_id, 3, kwargs.get("correction", ""), "", kwargs.get("comment", "")]
        with pytest.raises(AppError, match=match):
            client.predict(*args, api_name="/rate")
    assert counts(api_app) == (1, 0)


@pytest.mark.parametrize("turn_id, score, match", [
    (1.5, 3, "turn id must be a positive whole number"),
    (1, 2.5, "score must be a whole number from 1 to 5"),
    (-1, 3, "turn id must be a positive whole number"),
    ("abc", 3, "turn id must be a number, not 'abc'"),
    (1, "x", "score must be a number from 1 to 5, not 'x'"),
    ([1], 3, "turn id must be a number"),
])
def test_rate_takes_whole_numbers_only(api_app, tmp_path, turn_id, score, match):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from conftest import draw_lesion

    draw_lesion().save(tmp_path / "a.png")
    client = Client(api_app.url, verbose=False)
    for question in ("First?", "Second?"):  # turns 1 and 2: a rounded 1.5 would land on someone's turn 2
        client.predict([handle_file(str(tmp_path / "a.png"))], question, "", "", api_name="/ask")
    with pytest.raises(AppError, match=match):
        client.predict(turn_id, score, "", "", "", api_name="/rate")
    assert counts(api_app) == (2, 0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "1e999", "2.5", True and "x"])
def test_malformed_numbers_are_one_line_messages(value):
    from core.errors import InputError
    from demo.common import parse_id, parse_score

    for parse in (parse_score, lambda v: parse_id(v, "turn id")):
        with pytest.raises(InputError) as e:
            parse(value)
        assert "\n" not in str(e.value)


def test_a_prompt_over_the_token_budget_is_refused_before_generation(tiny_model_dir):
    from core.config import Settings
    from core.engine import Engine
    from core.errors import InputError
    from core.models import load_model

    engine = Engine(load_model(tiny_model_dir), Settings.from_env(max_prompt_tokens=300, max_new_tokens=4))
    with pytest.raises(InputError, match="tokens long with its images; the limit is 300"):
        engine.answer([], "word " * 400)
    assert engine.answer([], "Hi?").status == "complete"


@pytest.mark.parametrize("text", [
    "![x](http://192.0.2.7/p.png)", "<img src=http://192.0.2.7/p.png>", "[![a](http://192.0.2.7/p.png)](http://x)",
    "<script>alert(1)</script>", "![x][r]\n\n[r]: http://192.0.2.7/p.png",
])
def test_user_text_and_answers_carry_no_markdown_image_or_html(text):
    from markdown_it import MarkdownIt

    from demo.common import model_markdown, plain

    md = MarkdownIt("commonmark", {"html": True, "linkify": False})
    for shown in (plain(text), model_markdown(text)):
        rendered = md.render(shown)
        assert "<img" not in rendered and "<script" not in rendered, (shown, rendered)


# ------------------------------------------------------------------------------ uploads


def patient_photo(path: Path) -> Path:
    """A JPEG named like a patient, with GPS and a description in its EXIF."""
    from PIL import Image

    from conftest import draw_lesion

    exif = Image.Exif()
    exif[0x010E] = "Jane Doe, MRN 12345, left shoulder"  # ImageDescription
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0)}  # GPS
    draw_lesion().save(path, format="JPEG", exif=exif)
    return path


def names_under(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.is_file()]


def test_api_uploads_are_swept_and_stored_without_their_names(tiny_model_dir, tmp_path, monkeypatch):
    from gradio_client import Client, handle_file

    from test_api import App

    uploads = tmp_path / "uploads"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    photo = patient_photo(tmp_path / "Jane Doe MRN12345.jpg")
    app = App(tmp_path / "home", tiny_model_dir)
    try:
        Client(app.url, verbose=False).predict([handle_file(str(photo))], "What is it?", "", "", api_name="/ask")
        # Gradio's copy waits for the sweeper (a queued call with the same file may still need it).
        young = sweep_uploads(app.demo.upload_file_set)
        assert young == 0 and [n for n in names_under(uploads) if "Jane" in n]
        cached_examples = [p for p in uploads.rglob("*.png") if "dermaloop-clean" not in str(p)]
        assert sweep_uploads(app.demo.upload_file_set, now=time.time() + UPLOAD_MAX_AGE_S + 1) == 1
        assert all(p.exists() for p in cached_examples)  # Gradio's own cache is not ours to sweep
        assert not [n for n in names_under(uploads) if "Jane" in n], names_under(uploads)
        stored = names_under(tmp_path / "home" / "images")
        assert len(stored) == 1 and "Jane" not in stored[0]
    finally:
        app.close()


def test_a_page_upload_is_replaced_at_once_by_clean_pixels_under_a_neutral_name(tiny_engine, tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    from PIL import Image

    from annotation_db.db import Store
    from core.config import Settings
    from demo.common import Ctx
    from demo.consult import Consult
    from demo.runtime import DemoOptions, attach

    uploads = tmp_path / "uploads"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    (uploads / "abc123").mkdir(parents=True)
    original = patient_photo(uploads / "abc123" / "Jane Doe MRN12345.jpg")
    settings = Settings.from_env(home=tmp_path / "home", model=str(tiny_model_dir))
    store = Store.open(settings.db_url)
    try:
        consult = Consult(Ctx(attach(settings, tiny_engine, store, DemoOptions()), AuthConfig.local(), DemoOptions()))
        who = SimpleNamespace(username=None, session_hash="tab")
        [clean] = consult.clean_uploads([str(original)], who)
        assert not original.exists() and not original.parent.exists()
        sha = Path(clean).stem
        assert len(sha) == 64 and Path(clean) == uploads / "dermaloop-clean" / sha[:2] / f"{sha}.png"
        with Image.open(clean) as img:
            assert not img.getexif() and not img.info.get("exif")
        (uploads / "def456").mkdir()
        (uploads / "def456" / "John Roe.png").write_bytes(b"not an image")
        assert consult.clean_uploads([str(uploads / "def456" / "John Roe.png")], who) is None  # a warning, nothing kept
        assert not (uploads / "def456").exists()
    finally:
        store.dispose()


def test_our_upload_folder_is_emptied_at_start_and_a_deployers_is_left_alone(tmp_path):
    from demo.security import prepare_upload_folder

    env: dict = {}
    folder = prepare_upload_folder(tmp_path / "home", env)
    (folder / "x").mkdir()
    (folder / "x" / "Jane Doe.jpg").write_bytes(b"left by a killed app")
    assert prepare_upload_folder(tmp_path / "home", {}) == folder and names_under(folder) == []
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("x")
    assert prepare_upload_folder(tmp_path / "home", {"GRADIO_TEMP_DIR": str(theirs)}) == theirs
    assert names_under(theirs) == ["keep.txt"]


# ------------------------------------------------------------------------------ sessions belong to users


def test_another_users_session_id_reaches_nothing_of_theirs(tiny_engine, tiny_model_dir, tmp_path, users):
    import gradio as gr

    from annotation_db.db import Store
    from core.config import Settings
    from demo.common import Ctx
    from demo.consult import Case, Consult
    from demo.review import Review, ReviewState
    from demo.runtime import DemoOptions, attach

    from conftest import ask, counts, req, save_png
    settings = Settings.from_env(home=tmp_path / "home", model=str(tiny_model_dir), max_new_tokens=8)
    store = Store.open(settings.db_url)
    try:
        ctx = Ctx(attach(settings, tiny_engine, store, DemoOptions()), users, DemoOptions())
        consult, case = Consult(ctx), Case()
        ask(consult, case, [save_png(tmp_path / "a.png")], "What is it?", who="cara", session="cara-tab")
        # eve replays cara's session id: her page state (the conversation) is refused to eve
        with pytest.raises(gr.Error, match="belongs to another signed-in user"):
            ask(consult, case, [], "And the history?", who="eve", session="cara-tab")
        with pytest.raises(gr.Error, match="belongs to another signed-in user"):
            consult.rate(case, 4, "", "", [], "", req("eve", "cara-tab"))
        assert counts(store) == {"turns": 1, "ratings": 0}
        # Stop from eve with cara's session id does not reach cara's running answer.
        running = type("G", (), {"stopped": False, "stop": lambda self: setattr(self, "stopped", True)})()
        consult._running[consult._key(users.identify(req("cara")), req("cara", "cara-tab"))] = running
        consult.stop(req("eve", "cara-tab"))
        assert not running.stopped
        consult.stop(req("cara", "cara-tab"))
        assert running.stopped
        # A review page belongs to its expert too.
        review, state = Review(ctx), ReviewState()
        review.load(state, False, req("eve", "eve-tab"))
        with pytest.raises(gr.Error, match="belongs to another signed-in user"):
            review.save(state, False, 5, "", "", [], "", req("max", "eve-tab"))
    finally:
        store.dispose()


# ------------------------------------------------------------------------------ the queue under a session flood


def test_a_flood_of_session_ids_does_not_stop_the_queue(tiny_model_dir, tmp_path):
    from test_api import App

    app = App(tmp_path / "home", tiny_model_dir)
    app.delay_s = 6.0  # the first answer holds the generation slot; the victims wait in the queue
    from gradio.utils import LRUCache

    # Gradio keeps the last 2,000 sessions; 50 here makes the same eviction happen in seconds.
    app.demo._queue.pending_messages_per_session = LRUCache(50)
    from demo.security import UsageLimits, UsagePolicy

    # The per-user session cap would refuse most of this flood early: lift it to test the queue itself.
    app.demo.dermaloop.limits = UsageLimits(UsagePolicy(calls_per_minute=10**6, sessions_per_window=10**6))
    try:
        ids = {d["api_name"]: d["id"] for d in app.demo.config["dependencies"] if d.get("api_name")}
        assert httpx.get(app.url + "healthz").json()["status"] == "ok"
        started = time.time()
        with httpx.Client(base_url=app.url + "gradio_api/", timeout=30) as c:
            for session in ("holder", "victim", "victim-2"):
                c.post("queue/join", json={"data": [[], "Is it benign?", "", ""], "fn_index": ids["ask"],
                                           "session_hash": session}).raise_for_status()
            from concurrent.futures import ThreadPoolExecutor

            def refused_rate(i: int) -> None:  # each from a new session id: the victims' are evicted
                c.post("queue/join", json={"data": [999_999, 5, "", "", ""], "fn_index": ids["rate"],
                                           "session_hash": f"flood-{i}"})

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(refused_rate, range(120)))
            flood_s = time.time() - started
        assert flood_s < app.delay_s, f"the flood ({flood_s:.0f} s) must end while the victims still wait"
        deadline = time.time() + 90
        while time.time() < deadline and (len(app.demo._queue) or any(app.demo._queue.active_jobs)):
            time.sleep(0.5)
        app.delay_s = 0.0
        health = httpx.get(app.url + "healthz")
        assert health.status_code == 200 and health.json()["queue_stopped"] is False, health.text
        from gradio_client import Client

        answer, *_ = Client(app.url, verbose=False).predict([], "Still there?", "", "", api_name="/ask")
        assert isinstance(answer, str)
    finally:
        app.close()


# ------------------------------------------------------------------------------ leftovers of killed processes


def test_image_files_no_answer_refers_to_are_removed_at_start_when_old(tiny_model_dir, dermaloop_home):
    import os

    from annotation_db import store as st
    from annotation_db.db import Store
    from core.config import Settings
    from core.images import intake
    from demo.runtime import DemoOptions, start

    from conftest import draw_lesion

    settings = Settings.from_env(model=str(tiny_model_dir))
    kept = intake(draw_lesion(), settings.images_dir)
    orphan = intake(draw_lesion(colour=(20, 20, 20)), settings.images_dir)  # an answer killed before its record
    fresh = intake(draw_lesion(colour=(200, 20, 20)), settings.images_dir)  # an answer under way
    db = Store.open(settings.db_url)
    with db.session() as s:
        st.record_image(s, kept.sha256, kept.width, kept.height)
    db.dispose()
    for img in (kept, orphan):
        old = time.time() - 2 * 3600
        os.utime(img.path, (old, old))
    runtime = start(settings, DemoOptions(poll_s=0), progress=lambda m: None)
    runtime.housekeeping.join(timeout=60)  # off the start path, in the background
    runtime.store.dispose()
    assert kept.path.exists() and fresh.path.exists() and not orphan.path.exists()


def test_refine_removes_a_half_copied_adapter_left_by_a_killed_registration(dermaloop_home, tiny_model_dir, tmp_path):
    from core.config import Settings
    from training.refine import run as refine

    settings = Settings.from_env(model=str(tiny_model_dir))
    leftover = settings.models_dir / ".tmp-v2-4242"
    leftover.mkdir(parents=True)
    (leftover / "adapter_model.safetensors").write_bytes(b"half")
    assert refine.main(["--model", str(tiny_model_dir), "--quiet"]) == 0  # nothing new to train: skipped
    assert not leftover.exists()


# ------------------------------------------------------------------------------ exports: owner only, expiring


def test_export_links_name_their_owner_and_expire():
    from demo.security import ExportLinks

    clock = Clock()
    links = ExportLinks(ttl_s=60, clock=clock)
    name = links.prefix("eve") + "turns.csv"
    assert links.check(name, "eve", False) == 200 and links.check(name, "max", False) == 403
    assert links.check(name, None, False) == 403 and links.check(name, "ada", True) == 200
    forged = name.replace(name.split("-")[2], str(int(clock.now) + 10**6))  # a later expiry, same tag
    assert links.check(forged, "eve", False) == 403
    clock.now += 61
    assert links.check(name, "eve", False) == 410
    assert links.check("turns.csv", "max", False) == 200  # not an export: Gradio's own rules apply


def test_an_experts_export_is_refused_to_another_expert_over_http(tiny_model_dir, tmp_path):
    from demo.insights import Insights

    from conftest import req
    from test_api import App
    users_file = tmp_path / "users.yaml"
    for name, role in (("eve", "expert"), ("max", "expert"), ("ada", "admin")):
        add_user(users_file, name, role, f"{name}-pw", rounds=4)
    app = App(tmp_path / "home", tiny_model_dir, auth=AuthConfig.from_file(users_file))
    try:
        ctx = app.demo.dermaloop
        [first, *_] = Insights(ctx).export("csv", req("eve"))
        assert Path(first).name.startswith("dermaloop-export-")

        def fetch(user: str) -> httpx.Response:
            with httpx.Client(base_url=app.url) as c:
                c.post("login", data={"username": user, "password": f"{user}-pw"}).raise_for_status()
                return c.get(f"gradio_api/file={first}")

        assert fetch("max").status_code == 403
        assert fetch("eve").text != "Not your export." and fetch("ada").text != "Not your export."
        ctx.links.clock = lambda: time.time() + 2 * 3600
        assert fetch("eve").status_code == 410
    finally:
        app.close()


# ------------------------------------------------------------------------------ per-user limits


def test_per_user_limits_on_calls_sessions_and_uploads():
    from demo.auth import Denied
    from demo.security import UsageLimits, UsagePolicy

    clock = Clock()
    limits = UsageLimits(UsagePolicy(calls_per_minute=3, sessions_per_window=2, uploads_per_window=3,
                                     upload_bytes_per_window=100, window_s=600), clock)
    for _ in range(3):
        limits.call("cara", "tab-1")
    with pytest.raises(Denied, match="too many requests"):
        limits.call("cara", "tab-1")
    limits.call("eve", "x")  # others are not affected
    clock.now += 61
    limits.call("cara", "tab-2")
    with pytest.raises(Denied, match="too many sessions"):
        limits.call("cara", "tab-3")  # a script minting session ids
    limits.call("cara", "tab-1")  # an open page still works
    limits.upload("cara", [40, 40])
    with pytest.raises(Denied, match="upload quota"):
        limits.upload("cara", [40])  # 120 bytes > 100
    limits.upload("cara", [10])
    with pytest.raises(Denied, match="upload quota"):
        limits.upload("cara", [1])  # a 4th image
    clock.now += 601
    limits.upload("cara", [40, 40])


def test_a_clinician_flooding_refused_rates_is_slowed_with_a_message(tiny_model_dir, tmp_path, users):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from demo.security import UsageLimits, UsagePolicy

    from test_api import App

    app = App(tmp_path / "home", tiny_model_dir, auth=users)
    app.demo.dermaloop.limits = UsageLimits(UsagePolicy(calls_per_minute=5))
    try:
        eve = Client(app.url, auth=("eve", "eve-pw"), verbose=False)
        messages = []
        for _ in range(7):
            with pytest.raises(AppError) as e:
                eve.predict(999, 3, "", "", "", api_name="/rate")
            messages.append(str(e.value))
        assert "no turn with id 999" in messages[0] and "too many requests" in messages[-1]
    finally:
        app.close()
