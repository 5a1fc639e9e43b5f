"""The named API through gradio_client against the app launched on loopback.

/ask then /rate (checking the store), clear errors, the documented example run as
written, a version promoted while the app runs, logins with roles, and rating that
never waits behind a generation.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from annotation_db import store as st
from annotation_db.db import Store
from annotation_db.export import frames
from core.config import Settings
from core.engine import Engine
from core.models import load_model
from demo.app import build_demo, launch_kwargs
from demo.auth import AuthConfig, add_user
from demo.runtime import DemoOptions, attach

from conftest import draw_lesion

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _SlowStreamer:
    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s = inner, delay_s

    def put(self, value):
        time.sleep(self.delay_s)
        self.inner.put(value)

    def end(self):
        self.inner.end()


class App:
    """A launched app, its store and a way to slow generation down."""

    def __init__(self, home: Path, model_dir: Path, auth: AuthConfig | None = None, max_new_tokens: int = 8):
        self.settings = Settings.from_env(home=home, model=str(model_dir), max_new_tokens=max_new_tokens)
        self.store = Store.open(self.settings.db_url)
        loaded = load_model(model_dir)
        self.delay_s = 0.0  # before each answer
        self.token_delay_s = 0.0  # per streamed token, so a browser can watch the answer grow

        def slow_generate(**kwargs):
            time.sleep(self.delay_s)
            if self.token_delay_s and kwargs.get("streamer") is not None:
                kwargs["streamer"] = _SlowStreamer(kwargs["streamer"], self.token_delay_s)
            return loaded.model.generate(**kwargs)

        engine = Engine(loaded, self.settings, generate_fn=slow_generate)
        options = DemoOptions(poll_s=0)
        runtime = attach(self.settings, engine, self.store, options)
        self.demo = build_demo(self.settings, auth=auth, options=options, runtime=runtime)
        self.port = free_port()
        self.demo.launch(**launch_kwargs(self.demo, server_name="127.0.0.1", server_port=self.port,
                                         prevent_thread_lock=True, quiet=True))
        self.url = f"http://127.0.0.1:{self.port}/"

    def close(self) -> None:
        self.demo.close()
        self.store.dispose()


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    a = App(tmp_path_factory.mktemp("api-home"), tiny_model_dir)
    yield a
    a.close()


@pytest.fixture(scope="module")
def client(app) -> Client:
    return Client(app.url, verbose=False)


@pytest.fixture
def lesion(tmp_path) -> str:
    path = tmp_path / "lesion.jpg"
    draw_lesion().save(path)
    return str(path)


def test_ask_then_rate_is_recorded_in_the_store(app, client, lesion):
    answer, cid, tid, version = client.predict([handle_file(lesion)], "What is this lesion?", '{"age": 61, "body_site": "scalp"}',
                                               "", api_name="/ask")
    assert isinstance(answer, str) and version == "v1"
    follow = client.predict([], "Is it urgent?", "", str(int(cid)), api_name="/ask")
    assert follow[1] == cid and follow[2] != tid
    rating_id = client.predict(tid, 2, "Actinic keratosis; treat with cryotherapy.", "actinic keratosis", "scaly",
                               api_name="/rate")
    with app.store.session() as s:
        f = frames(s)
        history = st.conversation_history(s, int(cid))
    turns = f["turns"].set_index("turn_id")
    assert turns.loc[int(tid), "answer"] == answer and turns.loc[int(tid), "model_version"] == "v1"
    assert turns.loc[int(tid), "context"] == {"age": 61, "body_site": "scalp"}
    assert [len(h.image_hashes) for h in history] == [1, 0]
    rating = f["ratings"].set_index("rating_id").loc[int(rating_id)]
    assert rating["correction"] == "Actinic keratosis; treat with cryotherapy." and rating["diagnosis"] == "actinic keratosis"
    assert rating["turn_id"] == int(tid) and rating["model_version"] == "v1"


@pytest.mark.parametrize(
    "args, message",
    [
        (([], "", "", ""), "question is empty"),
        (([], "x" * 100_000, "", ""), "100,000 characters"),
        (([], "What?", "{oops", ""), "not valid JSON"),
        (([], "What?", "", "999999"), "no conversation"),
    ],
)
def test_ask_errors_are_clear(app, client, args, message):
    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name="/ask")


def test_a_non_image_upload_is_refused_and_nothing_is_stored(app, client, tmp_path):
    with app.store.session() as s:
        before = len(frames(s)["turns"])
    bad = tmp_path / "notes.png"
    bad.write_text("patient name and notes, not an image")
    with pytest.raises(AppError, match="not an image"):
        client.predict([handle_file(str(bad))], "What is it?", "", "", api_name="/ask")
    with pytest.raises(AppError, match="1 to 5"):
        client.predict(1, 7, "", "", "", api_name="/rate")
    with app.store.session() as s:
        assert len(frames(s)["turns"]) == before


def _python_examples(path: Path) -> list[str]:
    return [b for b in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S) if "gradio_client" in b]


def test_the_documented_examples_run_as_written(app, tmp_path, monkeypatch):
    docs = _python_examples(ROOT / "docs" / "api.md")
    readme = _python_examples(ROOT / "README.md") if (ROOT / "README.md").exists() else []
    assert docs, "docs/api.md must hold a runnable gradio_client example"
    monkeypatch.chdir(tmp_path)
    draw_lesion().save(tmp_path / "lesion.jpg")
    for code in docs + readme:
        code = code.replace("http://127.0.0.1:7860/", app.url).replace("http://localhost:7860/", app.url)
        exec(compile(code, "example", "exec"), {"__name__": "example"})


def test_a_version_promoted_while_the_app_runs_answers_next(app, client, lesion, tiny_adapter_dir):  # noqa: F811
    *_, version = client.predict([handle_file(lesion)], "Before?", "", "", api_name="/ask")
    with app.store.session() as s:
        cand = st.register_version(s, base_model=app.settings.model, adapter_path=str(tiny_adapter_dir),
                                   parent_id=st.active_version(s).id)
        st.promote(s, cand.id, reason="test")
        name = cand.name
    assert name != version
    *_, after = client.predict([handle_file(lesion)], "After?", "", "", api_name="/ask")
    assert after == name


def test_rating_does_not_wait_behind_generation(app, client, lesion):
    _, _, tid, _ = client.predict([handle_file(lesion)], "Quick one?", "", "", api_name="/ask")
    app.delay_s = 4.0
    try:
        start = time.perf_counter()
        jobs = [client.submit([handle_file(lesion)], f"Slow answer {i}?", "", "", api_name="/ask") for i in range(2)]
        time.sleep(0.5)
        t0 = time.perf_counter()
        client.predict(tid, 4, "", "", "", api_name="/rate")
        rate_s = time.perf_counter() - t0
        assert not all(j.done() for j in jobs), "the slow answers should still be running"
        assert rate_s < app.delay_s - 0.5, f"rating waited {rate_s:.1f} s behind generation"
        answers = [j.result() for j in jobs]
        assert all(isinstance(a[0], str) and a[2] for a in answers)
        # Asked at once, they are batched (core/scheduler.py): one delay (or two, when the second missed the window).
        assert time.perf_counter() - start >= app.delay_s
        assert app.demo.dermaloop.runtime.scheduler.stats.batches >= 1
    finally:
        app.delay_s = 0.0


def test_logins_act_as_the_user_with_their_role(tiny_model_dir, tmp_path, lesion):
    users = tmp_path / "users.yaml"
    add_user(users, "cara", "clinician", "cara-pw", rounds=4)
    add_user(users, "eve", "expert", "eve-pw", rounds=4)
    app = App(tmp_path / "home", tiny_model_dir, auth=AuthConfig.from_file(users))
    try:
        with pytest.raises(Exception):
            Client(app.url, verbose=False)  # no credentials: the app is closed
        cara = Client(app.url, auth=("cara", "cara-pw"), verbose=False)
        _, _, tid, _ = cara.predict([handle_file(lesion)], "What is it?", "", "", api_name="/ask")
        with pytest.raises(AppError, match="clinician"):
            cara.predict(tid, 5, "", "", "", api_name="/rate")
        eve = Client(app.url, auth=("eve", "eve-pw"), verbose=False)
        eve.predict(tid, 3, "Better answer.", "", "", api_name="/rate")
        with app.store.session() as s:
            f = frames(s)
        assert list(f["turns"]["user_role"]) == ["clinician"]
        assert list(f["ratings"]["rater_role"]) == ["expert"]
    finally:
        app.close()


def test_rate_takes_flags_and_old_clients_without_them_still_work(app, client, lesion):
    _, _, tid, _ = client.predict([handle_file(lesion)], "What is it?", "", "", api_name="/ask")
    with_flags = client.predict(tid, 2, "", "", "", ["unsafe", "incomplete"], api_name="/rate")
    without = client.predict(tid, 4, "", "", "", api_name="/rate")  # a client written before flags
    ratings = frames_by_id(app)
    assert ratings.loc[int(with_flags), "flags"] == ["incomplete", "unsafe"] and ratings.loc[int(without), "flags"] == []
    with pytest.raises(AppError, match="unknown flag"):
        client.predict(tid, 4, "", "", "", ["rude"], api_name="/rate")


def frames_by_id(app):
    with app.store.session() as s:
        return frames(s)["ratings"].set_index("rating_id")


def test_erase_through_the_api_is_for_admins_only(tiny_model_dir, tmp_path, lesion):
    import json

    users = tmp_path / "users.yaml"
    add_user(users, "cara", "clinician", "cara-pw", rounds=4)
    add_user(users, "ada", "admin", "ada-pw", rounds=4)
    app = App(tmp_path / "home", tiny_model_dir, auth=AuthConfig.from_file(users))
    try:
        cara = Client(app.url, auth=("cara", "cara-pw"), verbose=False)
        _, cid, _, _ = cara.predict([handle_file(lesion)], "What is it?", "", "", api_name="/ask")
        with pytest.raises(AppError, match="only admins can erase"):
            cara.predict(str(int(cid)), "mine", api_name="/erase")
        ada = Client(app.url, auth=("ada", "ada-pw"), verbose=False)
        tomb = json.loads(ada.predict(str(int(cid)), "consent withdrawn", api_name="/erase"))
        assert tomb["erased_by"] == "ada" and tomb["turns"] == 1 and tomb["images_deleted"] == 1
        assert frames_by_id(app).empty and not list((app.settings.images_dir).glob("*/*.png"))
        with pytest.raises(AppError, match="erased"):
            cara.predict([], "And now?", "", str(int(cid)), api_name="/ask")
    finally:
        app.close()


def test_conversation_is_for_its_author_and_experts_only(tiny_model_dir, tmp_path, lesion):
    import json

    users = tmp_path / "users.yaml"
    for name, role in (("cara", "clinician"), ("carl", "clinician"), ("eve", "expert"), ("ada", "admin")):
        add_user(users, name, role, f"{name}-pw", rounds=4)
    app = App(tmp_path / "home", tiny_model_dir, auth=AuthConfig.from_file(users))
    try:
        cara, carl, eve, ada = (Client(app.url, auth=(n, f"{n}-pw"), verbose=False) for n in ("cara", "carl", "eve", "ada"))
        context = json.dumps({"age": 47, "body_site": "shoulder"})
        a1, cid, t1, v1 = cara.predict([handle_file(lesion)], "What is it?", context, "", api_name="/ask")
        a2, _, t2, _ = cara.predict([], "Should it be removed?", "", str(int(cid)), api_name="/ask")
        mine = json.loads(cara.predict(str(int(cid)), api_name="/conversation"))
        with app.store.session() as s:
            stored = st.conversation_history(s, int(cid))
        assert mine["owner"] == "cara" and mine["context"]["age"] == 47 and mine["context"]["body_site"] == "shoulder"
        assert [(t["turn_id"], t["question"], t["answer"], t["model_version"]) for t in mine["turns"]] == [
            (int(t1), "What is it?", a1, v1), (int(t2), "Should it be removed?", a2, v1)]
        assert mine["turns"][0]["image_hashes"] == stored[0].image_hashes and len(stored[0].image_hashes) == 1
        assert mine["turns"][1]["image_hashes"] == [] and mine["turns"][0]["created"] <= mine["turns"][1]["created"]
        assert json.loads(eve.predict(str(int(cid)), api_name="/conversation")) == mine
        assert json.loads(ada.predict(str(int(cid)), api_name="/conversation")) == mine
        with pytest.raises(AppError, match="not one of yours") as other:
            carl.predict(str(int(cid)), api_name="/conversation")
        with pytest.raises(AppError, match="not one of yours") as missing:  # the same answer: ids cannot be probed
            carl.predict(str(int(cid) + 1000), api_name="/conversation")
        assert "\n" not in str(other.value) and str(missing.value).replace(str(int(cid) + 1000), str(int(cid))) == str(other.value)
        with pytest.raises(AppError, match="no conversation with id"):
            eve.predict(str(int(cid) + 1000), api_name="/conversation")
        with pytest.raises(AppError, match="positive whole number"):
            eve.predict("1.5", api_name="/conversation")
        ada.predict(str(int(cid)), "consent withdrawn", api_name="/erase")
        for reader in (cara, eve):
            with pytest.raises(AppError, match="was erased"):
                reader.predict(str(int(cid)), api_name="/conversation")
    finally:
        app.close()
