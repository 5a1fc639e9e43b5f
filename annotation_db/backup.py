"""Backups: a consistent snapshot of the store and its image folder, taken while the app keeps writing.

    python -m annotation_db backup OUT_DIR              # OUT_DIR/annotations.db (or store.dump), images/, manifest.json
    python -m annotation_db restore OUT_DIR [--force]   # into --home (refuses a non-empty store without --force)

    from annotation_db.backup import backup, restore
    manifest = backup(url, home / "images", out)

SQLite: the online backup API (`sqlite3.Connection.backup`, all pages in one step),
which copies one committed state even while other connections write in WAL mode.
PostgreSQL: the documented `pg_dump --format=custom` (itself one consistent
snapshot) when `pg_dump` is on PATH; otherwise the exact command is given in the
error. Images are content-addressed files written by rename, so copying the files
present after the database snapshot gives every image the snapshot refers to
(unless an erasure deleted it meanwhile, which is what the erasure asked for).
`manifest.json` records the time, the counts of turns, ratings and images in the
snapshot, and its Alembic revision; `restore` refuses a snapshot whose revision this
code does not know.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy.engine import make_url

from .errors import Conflict, InvalidInput, NotFound, StoreError

MANIFEST = "manifest.json"
SQLITE_FILE = "annotations.db"
PG_DUMP_FILE = "store.dump"
COUNTED = ("turns", "ratings", "images")


class BackupError(StoreError):
    """A backup or restore that cannot be done here (a missing tool, an unsupported database)."""


@dataclass(frozen=True)
class Manifest:
    created: str  # ISO time, UTC
    dialect: str  # "sqlite" or "postgresql"
    database: str  # file name inside the snapshot folder
    alembic_revision: str | None
    counts: dict[str, int]  # rows in the snapshot: turns, ratings, images
    image_files: int  # files copied to images/

    @property
    def message(self) -> str:
        c = ", ".join(f"{k}: {v}" for k, v in self.counts.items())
        return f"snapshot at revision {self.alembic_revision}: {c}, image files: {self.image_files}"


def sqlite_path(url: str) -> Path:
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        raise BackupError(f"not a SQLite file database: {u.render_as_string(hide_password=True)}")
    return Path(u.database).expanduser().resolve()


def _pg_conninfo(url: str) -> str:
    """The URL as libpq takes it (no SQLAlchemy driver suffix)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def pg_dump_command(url: str, out: Path) -> list[str]:
    # The custom format is compressed and restorable selectively with pg_restore (PostgreSQL docs, pg_dump).
    return ["pg_dump", "--format=custom", "--no-owner", f"--file={out / PG_DUMP_FILE}", f"--dbname={_pg_conninfo(url)}"]


def pg_restore_command(url: str, snapshot: Path) -> list[str]:
    return ["pg_restore", "--clean", "--if-exists", "--no-owner", f"--dbname={_pg_conninfo(url)}", str(snapshot / PG_DUMP_FILE)]


def _sqlite_facts(path: Path) -> tuple[str | None, dict[str, int]]:
    """(alembic revision, row counts) of a SQLite file, read in one transaction."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        rev = con.execute("SELECT version_num FROM alembic_version").fetchone() if "alembic_version" in tables else None
        counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] if t in tables else 0 for t in COUNTED}
    finally:
        con.close()
    return (rev[0] if rev else None), counts


def _copy_images(src: Path, dst: Path) -> int:
    """Copy the stored image files (not a writer's half-written *.tmp); files already there are kept."""
    n = 0
    if not src.is_dir():
        return 0
    for f in src.rglob("*"):
        if not f.is_file() or f.suffix == ".tmp":
            continue
        target = dst / f.relative_to(src)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copy2(f, target)
            except FileNotFoundError:  # erased between listing and copying
                continue
        n += 1
    return n


def _write_manifest(out: Path, m: Manifest) -> None:
    (out / MANIFEST).write_text(json.dumps(asdict(m), indent=2) + "\n")


def backup(url: str, images_dir: Path, out: Path) -> Manifest:
    """Snapshot the store at `url` and the files in `images_dir` into the folder `out` (new or empty)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise Conflict(f"{out} is not empty; give a new folder for the snapshot")
    backend = make_url(url).get_backend_name()
    if backend == "postgresql":
        return _backup_pg(url, images_dir, out)
    src = sqlite_path(url)
    if not src.is_file():
        raise NotFound(f"no SQLite store at {src}")
    out.mkdir(parents=True, exist_ok=True)
    dst_path = out / SQLITE_FILE
    source = sqlite3.connect(str(src), timeout=60)
    dest = sqlite3.connect(str(dst_path))
    try:
        source.backup(dest)  # pages=-1: every page in one step, under one read transaction
        dest.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, readable without its -wal/-shm
    finally:
        dest.close()
        source.close()
    rev, counts = _sqlite_facts(dst_path)
    m = Manifest(datetime.now(timezone.utc).isoformat(timespec="seconds"), "sqlite", SQLITE_FILE, rev, counts,
                 _copy_images(Path(images_dir), out / "images"))
    _write_manifest(out, m)
    return m


def _backup_pg(url: str, images_dir: Path, out: Path) -> Manifest:
    cmd = pg_dump_command(url, out)
    if shutil.which("pg_dump") is None:
        shown = " ".join(cmd[:-1] + ["--dbname=postgresql://USER:PASSWORD@HOST:PORT/DB"])
        raise BackupError(f"pg_dump is not on PATH; install the PostgreSQL client tools or run: {shown}")
    from .db import Store, current_revision

    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise BackupError(f"pg_dump failed: {first}")
    # Counted after the dump; pg_dump's own snapshot is the consistent one, so these are approximate.
    from sqlalchemy import text

    with Store.open(url, migrate=False) as st, st.session() as s:
        counts = {t: s.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in COUNTED}
    m = Manifest(datetime.now(timezone.utc).isoformat(timespec="seconds"), "postgresql", PG_DUMP_FILE,
                 current_revision(url), counts, _copy_images(Path(images_dir), out / "images"))
    _write_manifest(out, m)
    return m


def read_manifest(snapshot: Path) -> Manifest:
    snapshot = Path(snapshot)
    path = snapshot / MANIFEST
    if not path.is_file():
        raise NotFound(f"no snapshot at {snapshot} ({MANIFEST} is missing)")
    try:
        m = Manifest(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"{path} is not a DermaLoop snapshot manifest ({e})") from None
    if not (snapshot / m.database).is_file():
        raise NotFound(f"snapshot {snapshot} lacks its database file {m.database}")
    return m


def _check_revision(rev: str | None) -> None:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    from .db import alembic_config

    if rev is None:
        raise InvalidInput("the snapshot has no Alembic revision; it is not a DermaLoop store")
    try:
        known = ScriptDirectory.from_config(alembic_config("sqlite://")).get_revision(rev)
    except CommandError:
        known = None
    if known is None:
        raise Conflict(f"the snapshot is at schema revision {rev!r}, which this code does not know; "
                       "restore it with the DermaLoop version that made it")


def _store_is_empty(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return True
    con = sqlite3.connect(str(path), timeout=60)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return not any(con.execute(f'SELECT 1 FROM "{t}" LIMIT 1').fetchone()
                       for t in tables if t not in ("alembic_version", "locks"))
    finally:
        con.close()


def _erasures(path: Path) -> list[tuple[int, str, str]]:
    """(conversation id, admin, reason) of every erasure recorded in the SQLite store at `path`."""
    if not path.is_file() or path.stat().st_size == 0:
        return []
    con = sqlite3.connect(str(path), timeout=60)
    try:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'erasures'").fetchone():
            return []
        return con.execute("SELECT e.conversation_id, u.name, e.reason FROM erasures e "
                           "JOIN users u ON u.id = e.erased_by_id ORDER BY e.id").fetchall()
    finally:
        con.close()


def _reapply_erasures(url: str, images_dir: Path, erased: list[tuple[int, str, str]]) -> list[int]:
    """Erase again what the replaced store had erased: a snapshot older than an erasure must not bring it back."""
    if not erased:
        return []
    from . import store as st
    from .db import Store
    from .erase import erase_conversation
    from .models import Conversation

    again = []
    with Store.open(url) as db:
        for cid, by, reason in erased:
            with db.session() as s:
                conv = s.get(Conversation, cid)
                if conv is None or conv.erased_at is not None:
                    continue
                st.get_or_create_user(s, by, "admin")  # an admin when they erased it, maybe not yet in the snapshot
            erase_conversation(db, cid, by=by, reason=f"{reason} (re-applied after a restore)", images_dir=images_dir)
            again.append(cid)
    return again


def restore(snapshot: Path, url: str, images_dir: Path, *, force: bool = False) -> tuple[Manifest, list[int]]:
    """Bring a snapshot back into the store at `url` and `images_dir`; stop the app first.

    Returns the manifest and the conversations erased again: an erasure recorded in the
    replaced store (`--force`) is re-applied to the restored one, so a patient's withdrawal
    of consent survives going back to an older snapshot."""
    snapshot = Path(snapshot)
    m = read_manifest(snapshot)
    _check_revision(m.alembic_revision)
    backend = make_url(url).get_backend_name()
    if m.dialect == "postgresql" or backend == "postgresql":
        if m.dialect != backend:
            raise InvalidInput(f"the snapshot is a {m.dialect} store; it cannot be restored into {backend}")
        shown = " ".join(pg_restore_command(url, snapshot)[:-2] + ["--dbname=postgresql://USER:PASSWORD@HOST:PORT/DB",
                                                                   str(snapshot / PG_DUMP_FILE)])
        raise BackupError(f"restore a PostgreSQL snapshot with: {shown}")
    target = sqlite_path(url)
    if not force and not _store_is_empty(target):
        raise Conflict(f"{target} already holds a store; add --force to replace it with the snapshot")
    erased = _erasures(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".restore")
    os.close(fd)
    try:
        shutil.copyfile(snapshot / m.database, tmp)
        # A WAL left from the old database would be replayed onto the restored file: remove it first.
        for side in ("-wal", "-shm", "-journal"):
            Path(f"{target}{side}").unlink(missing_ok=True)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _copy_images(snapshot / "images", Path(images_dir))
    rev, counts = _sqlite_facts(target)
    assert rev == m.alembic_revision and counts == m.counts, (rev, counts, m)
    return m, _reapply_erasures(url, Path(images_dir), erased)
