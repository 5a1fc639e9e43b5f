"""Engines, sessions and migrations for the annotation store.

`Store.open(url)` is what the app and training call: it migrates the database to
the newest schema (keeping every row) and hands out sessions. SQLite (the default,
one file in the data directory) gets WAL, foreign keys and a busy timeout on every
connection, so threads and processes can write at once without "database is locked"
reaching the caller; PostgreSQL works through the same URL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from .errors import InvalidInput

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another before giving up


def default_url(home: Path) -> str:
    """The SQLite file `<home>/annotations.db` as a SQLAlchemy URL."""
    return f"sqlite:///{Path(home).expanduser().resolve() / 'annotations.db'}"


def url_from_env(home: Path | str | None = None) -> str:
    """DERMALOOP_DB if set, else SQLite under `home` (else DERMALOOP_HOME, else ./dermaloop-data)."""
    if os.environ.get("DERMALOOP_DB"):
        return os.environ["DERMALOOP_DB"]
    home = home or os.environ.get("DERMALOOP_HOME") or "dermaloop-data"
    return default_url(Path(home))


def _on_sqlite_connect(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: a crash loses no committed row
    cur.close()


def _ensure_sqlite_dir(url: str) -> None:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1].split("?", 1)[0] if "///" in url else ""
        if path and path != ":memory:" and not path.startswith("file:"):
            Path(path).parent.mkdir(parents=True, exist_ok=True)


def make_engine(url: str, **kw) -> Engine:
    """An engine for `url`; SQLite files get WAL, foreign keys and a busy timeout."""
    try:
        if url.startswith("sqlite"):
            _ensure_sqlite_dir(url)
            connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
            engine = create_engine(url, connect_args=connect_args, **kw)
            event.listen(engine, "connect", _on_sqlite_connect)
        else:
            engine = create_engine(url, pool_pre_ping=True, **kw)
    except (ArgumentError, NoSuchModuleError, ValueError) as e:
        raise InvalidInput(f"not a usable database URL: {url!r} ({e})") from None
    return engine


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` to `revision` (default: the newest), keeping every row."""
    from alembic import command

    make_engine(url).dispose()  # checks the URL, creates the SQLite folder
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


@contextmanager
def session_scope(engine_or_factory) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back if it raises."""
    factory = engine_or_factory
    if isinstance(engine_or_factory, Engine):
        factory = sessionmaker(engine_or_factory, expire_on_commit=False)
    s = factory()
    try:
        yield s
        s.commit()
    except BaseException:
        s.rollback()
        raise
    finally:
        s.close()


class Store:
    """An engine and a session factory: `with Store.open(url).session() as s: ...`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.url = engine.url.render_as_string(hide_password=False)
        self.sessionmaker = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str, migrate: bool = True) -> Store:
        engine = make_engine(url)
        if migrate:
            upgrade(url)
        return cls(engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.sessionmaker) as s:
            yield s

    def dispose(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.dispose()
