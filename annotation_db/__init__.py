"""annotation_db: the expert-feedback store of DermaLoop (SQLAlchemy 2.0 + Alembic).

    from annotation_db import Store, store
    st = Store.open(url)              # migrates to the newest schema
    with st.session() as s:
        store.add_rating(s, turn_id, rater_id, 4, correction="...")

SQLite by default (WAL, foreign keys, busy timeout), PostgreSQL through the same
URL. Never imports torch, gradio or another DermaLoop package. See docs/store.md.
"""

from . import store
from .db import Store, default_url, make_engine, session_scope, upgrade
from .errors import Conflict, InvalidInput, LockHeld, NotFound, StoreError

__all__ = ["Conflict", "InvalidInput", "LockHeld", "NotFound", "Store", "StoreError", "default_url",
           "make_engine", "session_scope", "store", "upgrade"]
