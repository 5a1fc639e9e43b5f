"""Small helpers shared by the store modules: input checks and write serialisation."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from .errors import InvalidInput

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def dialect(s: Session) -> str:
    return s.get_bind().dialect.name


def write_lock(s: Session, key: int = 7_301_001) -> None:
    """Serialise this transaction with every other writer that takes the same lock.

    PostgreSQL: a transaction-scoped advisory lock. SQLite: start the write
    transaction now (a no-op UPDATE takes the database's write lock, waiting out the
    busy timeout), so the reads that follow see the latest committed state and no
    read-to-write upgrade can fail with "database is locked".
    """
    if dialect(s) == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
    else:
        s.execute(text("UPDATE locks SET pid = pid WHERE 0 = 1"))


def check_text(value: Any, field: str, *, max_len: int | None = None, required: bool = True,
               allow_blank: bool = False) -> str | None:
    """A person's text, stored verbatim: never stripped or escaped, only checked."""
    if value is None:
        if required:
            raise InvalidInput(f"{field} is required")
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be text, got {type(value).__name__}")
    if not allow_blank and not value.strip():
        raise InvalidInput(f"{field} is empty or only whitespace; leave it out instead")
    if "\x00" in value:
        raise InvalidInput(f"{field} contains a NUL character, which cannot be stored")
    if max_len is not None and len(value) > max_len:
        raise InvalidInput(f"{field} is {len(value)} characters long; the limit is {max_len}")
    return value


def check_json(value: Any, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{field} must be a mapping, got {type(value).__name__}")
    try:
        text_ = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"{field} cannot be stored as JSON: {e}") from None
    if "\\u0000" in text_:
        raise InvalidInput(f"{field} contains a NUL character, which cannot be stored")
    return value


def check_hash(value: Any) -> str:
    if not isinstance(value, str) or not SHA256_RE.match(value):
        raise InvalidInput(f"not an image hash (64 lowercase hex characters): {str(value)[:80]!r}")
    return value


def check_hashes(values: Iterable[str]) -> list[str]:
    if isinstance(values, str):
        raise InvalidInput("image hashes must be a list of hashes, not one string")
    return [check_hash(v) for v in values]


def check_int(value: Any, field: str, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field} must be a whole number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidInput(f"{field} must be from {lo} to {hi}, got {value}")
    return value


def as_utc(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything the store writes is UTC."""
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=timezone.utc)
