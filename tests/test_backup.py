"""`python -m annotation_db backup` / `restore`: a consistent snapshot while a writer keeps rating, and its restore."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time

import pytest

from annotation_db import NotFound, Store, store
from annotation_db.cli import run
from annotation_db.db import default_url

from conftest import draw_lesion


@pytest.fixture
def live(dermaloop_home):
    """A SQLite store in DERMALOOP_HOME with one answered turn and its image file on disk."""
    from core.images import intake

    st = Store.open(default_url(dermaloop_home))
    img = intake(draw_lesion(), dermaloop_home / "images")
    with st.session() as s:
        doc = store.get_or_create_user(s, "dr-clinic", "clinician")
        expert = store.get_or_create_user(s, "expert-1")
        v1 = store.ensure_base_version(s, "HuggingFaceTB/SmolVLM-256M-Instruct")
        store.record_image(s, img.sha256, img.width, img.height, nbytes=img.nbytes)
        c = store.start_conversation(s, doc.id, {"age": 61, "site": "arm"})
        t = store.record_turn(s, c.id, "What is this?", "A nevus.", image_hashes=[img.sha256], template="free",
                              model_version_id=v1.id)
    yield dict(store=st, turn=t.id, expert=expert.id, sha=img.sha256, path=img.path)
    st.dispose()


@contextlib.contextmanager
def rating_writer(live, at_least: int):
    """An expert who keeps rating (as the app does) while the block runs; yields the list of ratings
    committed so far, once it holds `at_least` of them. The writer stops when the block ends."""
    st, stop, written = live["store"], threading.Event(), []

    def writer():
        i = 0
        while not stop.is_set():
            with st.session() as s:
                store.add_rating(s, live["turn"], live["expert"], 1 + i % 5, comment=f"pass {i}")
            written.append(i)
            i += 1

    th = threading.Thread(target=writer, daemon=True)
    th.start()
    try:
        while len(written) < at_least:
            stop.wait(0.01)
        yield written
    finally:
        stop.set()
        th.join(30)


def _rows(path):
    con = sqlite3.connect(str(path))
    try:
        return (con.execute("SELECT id, turn_id, rater_id, score, comment FROM ratings ORDER BY id").fetchall(),
                con.execute("SELECT sha256 FROM images ORDER BY id").fetchall())
    finally:
        con.close()


def test_backup_while_writing_is_consistent_and_restores(live, dermaloop_home, tmp_path, capsys):
    with rating_writer(live, at_least=5) as written:
        out = tmp_path / "snap"
        assert run(["backup", str(out)]) == 0
        during = len(written)
        while len(written) < during + 3:  # the writer goes on after the snapshot
            time.sleep(0.01)
    assert "snapshot at revision" in capsys.readouterr().out

    manifest = json.loads((out / "manifest.json").read_text())
    con = sqlite3.connect(str(out / "annotations.db"))
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    got = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("turns", "ratings", "images")}
    rev = con.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    con.close()
    assert got == manifest["counts"] and rev == manifest["alembic_revision"]
    assert 5 <= got["ratings"] < len(written)  # taken mid-stream: what was committed then, nothing half-written
    assert (out / "images" / live["sha"][:2] / f"{live['sha']}.png").read_bytes() == live["path"].read_bytes()

    fresh = tmp_path / "fresh-home"
    assert run(["restore", str(out), "--home", str(fresh)]) == 0
    assert "restored" in capsys.readouterr().out
    assert _rows(fresh / "annotations.db") == _rows(out / "annotations.db")
    assert (fresh / "images" / live["sha"][:2] / f"{live['sha']}.png").read_bytes() == live["path"].read_bytes()
    with Store.open(default_url(fresh)) as again, again.session() as s:  # the app opens it as usual
        assert [t.answer for t in store.conversation_history(s, 1)] == ["A nevus."]


def test_restore_refuses_a_non_empty_store_without_force(live, dermaloop_home, tmp_path, capsys):
    out = tmp_path / "snap"
    assert run(["backup", str(out)]) == 0
    with live["store"].session() as s:
        store.add_rating(s, live["turn"], live["expert"], 2, comment="after the backup")
    capsys.readouterr()
    assert run(["restore", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and err.count("\n") == 1
    assert len(_rows(dermaloop_home / "annotations.db")[0]) == 1  # untouched
    live["store"].dispose()  # the app is stopped before a restore
    assert run(["restore", str(out), "--force"]) == 0
    assert _rows(dermaloop_home / "annotations.db")[0] == []


def test_missing_snapshot_and_occupied_target_are_one_line(tmp_path, capsys):
    assert run(["restore", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("annotation_db: no snapshot at") and err.count("\n") == 1
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert run(["backup", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_restore_refuses_an_unknown_revision(live, tmp_path, capsys):
    out = tmp_path / "snap"
    assert run(["backup", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "alembic_revision": "9999_from_the_future"}))
    assert run(["restore", str(out), "--home", str(tmp_path / "fresh")]) == 2
    assert "does not know" in capsys.readouterr().err


def test_postgresql_without_pg_dump_gives_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no pg_dump here
    url = "postgresql+psycopg://derma:secret@db.internal:5432/dermaloop"
    assert run(["backup", str(tmp_path / "snap"), "--db", url]) == 2
    err = capsys.readouterr().err
    assert "pg_dump --format=custom" in err and "secret" not in err and err.count("\n") == 1


def test_restore_over_a_store_keeps_its_erasures(live, dermaloop_home, tmp_path, capsys):
    from annotation_db.erase import erase_conversation

    out = tmp_path / "snap"
    assert run(["backup", str(out)]) == 0
    with live["store"].session() as s:
        store.get_or_create_user(s, "ada", "admin")
    erase_conversation(live["store"], 1, by="ada", reason="consent withdrawn", images_dir=dermaloop_home / "images")
    assert not live["path"].exists()
    live["store"].dispose()
    capsys.readouterr()
    assert run(["restore", str(out), "--force"]) == 0
    assert "erased again" in capsys.readouterr().out
    with Store.open(default_url(dermaloop_home)) as again, again.session() as s:
        with pytest.raises(NotFound, match="erased"):
            store.conversation_history(s, 1)
        assert [e.reason for e in store.list_erasures(s)] == ["consent withdrawn (re-applied after a restore)"]
    assert not live["path"].exists()  # the image the snapshot held is deleted again


# ------------------------------------------------------------- the periodic push to a private dataset repository (a Space)

TOKEN = "hf_" + "x" * 34  # what a Space's HF_TOKEN secret looks like; must never be pushed


class Hub:
    """HfApi's repository methods patched, up to the network: each call is checked against the real
    method's signature and recorded; what upload_folder would push is copied aside."""

    def __init__(self, monkeypatch, tmp_path, private=True):
        import inspect

        from huggingface_hub import HfApi

        self.calls, self.pushed, self.remote, self.private = [], [], [], private

        def fake(name, result):
            real = getattr(HfApi, name)

            def method(api, *args, **kwargs):
                inspect.signature(real).bind(api, *args, **kwargs)  # a call the real method would accept
                self.calls.append((name, args, kwargs))
                return result(*args, **kwargs)
            monkeypatch.setattr(HfApi, name, method)

        def upload(**kw):
            import shutil

            dst = tmp_path / f"pushed-{len(self.pushed)}"
            shutil.copytree(kw["folder_path"], dst)
            self.pushed.append(dst)
            self.remote = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())

        fake("create_repo", lambda *a, **k: None)
        fake("repo_info", lambda *a, **k: type("Info", (), {"private": self.private})())
        fake("list_repo_files", lambda *a, **k: list(self.remote))
        fake("upload_folder", upload)
        fake("super_squash_history", lambda *a, **k: None)

    def names(self):
        return [c[0] for c in self.calls]


def test_push_sends_a_consistent_snapshot_to_a_private_dataset_and_no_secret(live, dermaloop_home, tmp_path, monkeypatch):
    from annotation_db.hub_backup import HubBackup

    hub = Hub(monkeypatch, tmp_path)
    with rating_writer(live, at_least=3) as written:  # the app keeps rating while the snapshot is taken
        done = HubBackup(default_url(dermaloop_home), dermaloop_home / "images", "lab/dermaloop-backup", token=TOKEN).push()
    assert hub.names() == ["create_repo", "repo_info", "list_repo_files", "upload_folder"]
    create = hub.calls[0]
    assert create[1] == ("lab/dermaloop-backup",) and create[2]["private"] is True and create[2]["repo_type"] == "dataset"
    upload = hub.calls[3][2]
    assert upload["repo_type"] == "dataset" and upload["delete_patterns"] == "*" and "snapshot at revision" in upload["commit_message"]
    snap = hub.pushed[0]
    assert hub.remote == ["annotations.db", f"images/{live['sha'][:2]}/{live['sha']}.png", "manifest.json"]
    con = sqlite3.connect(str(snap / "annotations.db"))
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # a self-contained copy, not the live WAL file
    ratings = con.execute("SELECT count(*) FROM ratings").fetchone()[0]
    con.close()
    assert json.loads((snap / "manifest.json").read_text())["counts"]["ratings"] == ratings == done.manifest.counts["ratings"]
    assert 3 <= ratings <= len(written)
    assert not [p for p in snap.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert done.removed == [] and not done.squashed


def test_an_erased_image_leaves_the_backup_and_its_history(live, dermaloop_home, tmp_path, monkeypatch):
    from annotation_db.erase import erase_conversation
    from annotation_db.hub_backup import HubBackup

    hub = Hub(monkeypatch, tmp_path)
    pusher = HubBackup(default_url(dermaloop_home), dermaloop_home / "images", "lab/dermaloop-backup", token=TOKEN)
    pusher.push()
    with live["store"].session() as s:
        store.get_or_create_user(s, "ada", "admin")
    erase_conversation(live["store"], 1, by="ada", reason="consent withdrawn", images_dir=dermaloop_home / "images")
    done = pusher.push()
    assert done.removed == [f"images/{live['sha'][:2]}/{live['sha']}.png"] and done.squashed
    assert hub.names()[-2:] == ["upload_folder", "super_squash_history"] and hub.names().count("create_repo") == 1
    assert hub.remote == ["annotations.db", "manifest.json"]


def test_a_missing_token_or_a_public_repository_is_one_line(live, dermaloop_home, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from annotation_db.backup import BackupError
    from annotation_db.hub_backup import HubBackup
    from demo.__main__ import create

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(SystemExit) as e:
        create(["--backup-repo", "lab/dermaloop-backup", "--home", str(dermaloop_home)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: backing up to lab/dermaloop-backup needs a Hugging Face token")
    assert "HF_TOKEN" in err[-1]
    Hub(monkeypatch, tmp_path, private=False)
    with pytest.raises(BackupError, match="is public; make it private"):
        HubBackup(default_url(dermaloop_home), dermaloop_home / "images", "lab/open", token=TOKEN).push()
    with pytest.raises(Exception, match="OWNER/NAME"):
        HubBackup(default_url(dermaloop_home), dermaloop_home / "images", "no-owner", token=TOKEN)


def test_the_timer_pushes_again_and_outlives_a_failed_push(live, dermaloop_home, tmp_path, monkeypatch, caplog):
    from huggingface_hub import HfApi

    from annotation_db.hub_backup import HubBackup

    hub = Hub(monkeypatch, tmp_path)
    real_upload, failures = HfApi.upload_folder, []

    def flaky(api, **kw):  # the Hub is down once
        if not failures:
            failures.append(1)
            raise ConnectionError("hub unreachable")
        return real_upload(api, **kw)
    monkeypatch.setattr(HfApi, "upload_folder", flaky)
    pusher = HubBackup(default_url(dermaloop_home), dermaloop_home / "images", "lab/dermaloop-backup", token=TOKEN)
    with caplog.at_level("INFO", logger="dermaloop.backup"):
        pusher.start(every_min=0.002)  # 0.12 s
        try:
            for _ in range(500):
                if len(hub.pushed) >= 2:
                    break
                threading.Event().wait(0.02)
        finally:
            pusher.stop()
    assert len(hub.pushed) >= 2 and failures == [1]
    assert "retrying in" in caplog.text and "hub unreachable" in caplog.text and "backup pushed to lab/dermaloop-backup" in caplog.text
    assert TOKEN not in caplog.text
