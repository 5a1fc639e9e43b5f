"""Alembic environment: runs the revisions in `versions/` against the configured URL.

Called through `annotation_db.db.upgrade(url)`; no alembic.ini is needed. On SQLite,
foreign-key enforcement is switched off while a revision recreates a table (batch
mode), then the whole database is checked with `PRAGMA foreign_key_check`.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from annotation_db.models import Base

target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    is_sqlite = url.startswith("sqlite")
    connect_args = {"timeout": 60} if is_sqlite else {}
    engine = create_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
    with engine.connect() as connection:
        if is_sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")
            connection.commit()
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=is_sqlite,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
            if is_sqlite:
                bad = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                assert not bad, f"foreign key violations after migration: {bad[:5]}"
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
