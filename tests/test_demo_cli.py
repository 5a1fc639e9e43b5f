"""`python -m demo` as a person starts it, identities and roles, the Spaces set-up, the offline fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from demo.auth import AuthConfig, AuthError, Denied, add_user, auth_from_env, load_users, oauth_username, parse_roles
from demo.spaces import NO_PERSISTENCE, prepare

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_m_demo_starts_serves_and_reports_its_start_up_time(tiny_model_dir, dermaloop_home):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "demo", "--model", str(tiny_model_dir), "--port", str(port),
                             "--home", str(dermaloop_home)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Running on local URL" in line:
                break
        up_s = time.perf_counter() - start
        out = "".join(lines)
        assert f"http://127.0.0.1:{port}" in out, out
        assert "DermaLoop ready in" in out and "serving version v1" in out
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200
        print(f"start-up to serving: {up_s:.1f} s")
        assert up_s < 60, f"start-up took {up_s:.1f} s"  # the target is < 20 s on 2 cores; see the report
        assert (dermaloop_home / "annotations.db").exists()  # migrated before serving
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_python_m_demo_explains_what_is_wrong(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "demo", "--model", str(tmp_path / "nowhere"), "--no-offline-fallback"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "model directory not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad_auth = subprocess.run([sys.executable, "-m", "demo", "--auth-file", str(tmp_path / "users.yaml")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad_auth.returncode == 2 and "users file not found" in bad_auth.stderr
    bad_db = subprocess.run([sys.executable, "-m", "demo", "--db", "nosuchdb://x", "--model", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad_db.returncode == 2 and "not a usable database URL" in bad_db.stderr and "Traceback" not in bad_db.stderr


# ------------------------------------------------------------------------------ anonymous exposure


class _Started(Exception):
    """Raised by the stand-in for demo.runtime.start: the app got past its checks."""


def _create(monkeypatch, argv, env=None):
    """Run `create(argv)` with the model start replaced: "started", or (exit code, stderr) if it refused."""
    import demo.__main__ as main_mod
    import demo.runtime

    for name in ("SPACE_ID", "OAUTH_CLIENT_ID", "GRADIO_SERVER_NAME", "DERMALOOP_ALLOW_ANONYMOUS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)

    def start(*a, **k):
        raise _Started

    monkeypatch.setattr(demo.runtime, "start", start)
    try:
        main_mod.create(argv)
    except _Started:
        return "started"
    except SystemExit as e:
        return e.code
    raise AssertionError("create() neither started nor exited")


@pytest.mark.parametrize("argv, env", [
    (["--share"], {}),
    (["--host", "0.0.0.0"], {}),
    (["--host", "192.168.1.5"], {}),
    (["--host", "dermaloop.example.org"], {}),
    ([], {"GRADIO_SERVER_NAME": "0.0.0.0"}),
    ([], {"SPACE_ID": "someone/dermaloop"}),  # a Space without hf_oauth and without a users file
])
def test_login_free_mode_refuses_to_be_reachable_from_elsewhere(monkeypatch, capsys, argv, env):
    assert _create(monkeypatch, argv, env) == 2  # refused before the model or the store was started
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--allow-anonymous" in err and "--auth-file" in err


@pytest.mark.parametrize("argv", [[], ["--host", "127.0.0.1"], ["--host", "localhost"], ["--host", "::1"]])
def test_login_free_mode_on_loopback_starts_without_a_warning(monkeypatch, capsys, argv):
    assert _create(monkeypatch, argv) == "started"
    assert "WARNING" not in capsys.readouterr().err


@pytest.mark.parametrize("argv, env", [
    (["--share", "--allow-anonymous"], {}),
    (["--host", "0.0.0.0"], {"DERMALOOP_ALLOW_ANONYMOUS": "1"}),
])
def test_allow_anonymous_starts_exposed_with_a_warning(monkeypatch, capsys, argv, env):
    assert _create(monkeypatch, argv, env) == "started"
    assert "WARNING" in capsys.readouterr().err


def test_logins_make_exposed_starts_fine(monkeypatch, capsys, tmp_path):
    users = tmp_path / "users.yaml"
    add_user(users, "eve", "expert", "pw", rounds=4)
    assert _create(monkeypatch, ["--share", "--host", "0.0.0.0", "--auth-file", str(users)]) == "started"
    # A Space with hf_oauth: Hugging Face sign-in, as app.py starts it (no arguments, GRADIO_SERVER_NAME=0.0.0.0).
    assert _create(monkeypatch, [], {"SPACE_ID": "someone/dermaloop", "OAUTH_CLIENT_ID": "x",
                                     "GRADIO_SERVER_NAME": "0.0.0.0"}) == "started"
    assert "WARNING" not in capsys.readouterr().err and "error" not in capsys.readouterr().err


# ------------------------------------------------------------------------------ identities


def test_users_file_logins_and_roles(tmp_path):
    users = tmp_path / "users.yaml"
    add_user(users, "eve", "expert", "s3cret", rounds=4)
    add_user(users, "cara", "clinician", "pw", rounds=4)
    auth = AuthConfig.from_file(users)
    from demo.security import LoginGuard

    guard = LoginGuard(auth)
    assert guard.verify("eve", "s3cret") and not guard.verify("eve", "wrong")
    assert not guard.verify("nobody", "s3cret") and not guard.verify("eve", "")
    eve = auth.identify(SimpleNamespace(username="eve"))
    assert (eve.name, eve.role, eve.can_rate, eve.is_admin) == ("eve", "expert", True, False)
    with pytest.raises(Denied, match="clinician"):
        auth.require_rater(SimpleNamespace(username="cara"))
    with pytest.raises(Denied, match="only admins"):
        auth.require_admin(SimpleNamespace(username="eve"))
    with pytest.raises(Denied, match="sign in"):
        auth.identify(SimpleNamespace(username="mallory"))  # not in the file: never trusted
    assert "s3cret" not in users.read_text()


@pytest.mark.parametrize(
    "text, message",
    [
        ("users: {}", "no users"),
        ("users:\n  eve: {role: boss, password_hash: '$2b$04$x'}", "role"),
        ("users:\n  eve: {role: expert, password_hash: plain}", "bcrypt"),
        ("users: [unclosed", "not valid YAML"),
    ],
)
def test_bad_users_files_are_explained(tmp_path, text, message):
    path = tmp_path / "users.yaml"
    path.write_text(text)
    with pytest.raises(AuthError, match=message):
        load_users(path)


def test_oauth_roles_from_the_allow_list(monkeypatch):
    assert parse_roles("alice=admin, bob=expert\ncarol=clinician") == {"alice": "admin", "bob": "expert", "carol": "clinician"}
    with pytest.raises(AuthError):
        parse_roles("alice=boss")
    auth = AuthConfig.oauth("alice=admin,bob=expert")
    def signed_in(name):
        return SimpleNamespace(request=None, session={"oauth_info": {"userinfo": {"preferred_username": name},
                                                                     "expires_at": time.time() + 60}})
    assert auth.identify(signed_in("alice")).role == "admin"
    assert auth.identify(signed_in("zed")).role == "clinician"  # signed in, not listed
    expired = SimpleNamespace(request=None, session={"oauth_info": {"userinfo": {"preferred_username": "bob"}, "expires_at": 1}})
    assert oauth_username(expired) is None
    with pytest.raises(Denied, match="Hugging Face"):
        auth.identify(SimpleNamespace(request=None, session={}))
    # API calls (gradio_client's hf_token=) carry a token instead of a session: the Hub names its owner.
    import huggingface_hub

    asked: list[str] = []
    monkeypatch.setattr(huggingface_hub, "whoami", lambda token: asked.append(token) or
                        ({"name": "bob"} if token == "hf_good" else (_ for _ in ()).throw(ValueError("401"))))
    def api_call(token):
        return SimpleNamespace(request=None, session={}, headers={"authorization": f"Bearer {token}"})
    assert auth.identify(api_call("hf_good")).role == "expert"
    assert auth.identify(api_call("hf_good")).name == "bob" and asked == ["hf_good"]  # cached
    with pytest.raises(Denied):
        auth.identify(api_call("hf_bad"))
    monkeypatch.setenv("SPACE_ID", "someone/dermaloop")
    monkeypatch.setenv("OAUTH_CLIENT_ID", "x")
    monkeypatch.setenv("DERMALOOP_ROLES", "bob=expert")
    assert auth_from_env(None, "local").mode == "oauth"
    monkeypatch.delenv("SPACE_ID")
    assert auth_from_env(None, "me").mode == "local"


def test_spaces_setup_uses_persistent_storage_or_warns(tmp_path):
    assert prepare({}).on_space is False
    data = tmp_path / "data"
    data.mkdir()
    env = {"SPACE_ID": "someone/dermaloop"}
    info = prepare(env, data_root=data)
    assert info.persistent and env["DERMALOOP_HOME"] == str(data / "dermaloop") and env["HF_HOME"] == str(data / ".huggingface")
    env = {"SPACE_ID": "someone/dermaloop"}
    info = prepare(env, data_root=tmp_path / "absent")
    assert not info.persistent and info.notices == [NO_PERSISTENCE] and "DERMALOOP_HOME" not in env


# ------------------------------------------------------------------------------ offline model


def test_oauth_mode_shows_the_hugging_face_login_button(tiny_engine, tiny_model_dir, dermaloop_home, monkeypatch):
    import gradio.oauth as go

    from annotation_db.db import Store

    # What a Space with `hf_oauth: true` provides (nothing is contacted while building the app).
    monkeypatch.setattr(go, "get_space", lambda: "someone/dermaloop")
    for name, value in (("OAUTH_CLIENT_ID", "id"), ("OAUTH_CLIENT_SECRET", "secret"), ("OAUTH_SCOPES", "openid profile"),
                        ("OPENID_PROVIDER_URL", "https://huggingface.co")):
        monkeypatch.setattr(go, name, value)
    from core.config import Settings
    from demo.app import build_demo, launch_kwargs

    settings = Settings.from_env(model=str(tiny_model_dir))
    store = Store.open(settings.db_url)
    try:
        demo = build_demo(settings, tiny_engine, store, auth=AuthConfig.oauth("ada=admin"))
        kinds = {c["type"] for c in demo.config["components"]}
        assert "loginbutton" in kinds or "button" in kinds
        assert any(c.get("props", {}).get("value") == "Sign in with Hugging Face" for c in demo.config["components"])
        assert "auth" not in launch_kwargs(demo)  # no password form: OAuth signs people in
    finally:
        store.dispose()
