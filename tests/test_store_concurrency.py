"""Concurrent writers: no rating lost, no "database is locked" reaching the caller,
and exactly one active model version after racing promotions."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from annotation_db import Store, store
from annotation_db.models import Rating, VersionStatus

ROOT = Path(__file__).resolve().parents[1]




def _seed(st: Store, writers: int, turns: int = 50) -> tuple[list[int], list[int], int]:
    with st.session() as s:
        doc = store.get_or_create_user(s, "clinician", "clinician")
        experts = [store.get_or_create_user(s, f"expert-{i}").id for i in range(writers)]
        reader = store.get_or_create_user(s, "reader").id
        v = store.ensure_base_version(s, "base")
        c = store.start_conversation(s, doc.id, {})
        turn_ids = [store.record_turn(s, c.id, f"q{i}", f"a{i}", image_hashes=[], template="t",
                                      settings={}, model_version_id=v.id).id for i in range(turns)]
    return experts, turn_ids, reader


def _readers(st: Store, reader: int, stop: threading.Event, errors: list) -> list[threading.Thread]:
    def read():
        while not stop.is_set():
            try:
                with st.session() as s:
                    store.review_queue(s, reader, need=3, limit=5)
                    store.review_queue_count(s, reader, need=3)
                time.sleep(0.005)  # poll like a page would, without starving the writers
            except Exception as e:  # noqa: BLE001  collected and asserted empty
                errors.append(e)
    return [threading.Thread(target=read) for _ in range(2)]


def test_eight_threads_write_every_rating(url):
    st = Store.open(url)
    experts, turn_ids, reader = _seed(st, 8)
    errors: list[Exception] = []
    stop = threading.Event()

    def write(rater: int):
        for i in range(250):
            try:
                with st.session() as s:
                    store.add_rating(s, turn_ids[i % len(turn_ids)], rater, 1 + i % 5, comment=f"{rater}:{i}")
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    readers = _readers(st, reader, stop, errors)
    writers = [threading.Thread(target=write, args=(r,)) for r in experts]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors[:3]
    with st.session() as s:
        assert s.scalar(select(func.count()).select_from(Rating)) == 8 * 250
        comments = set(s.scalars(select(Rating.comment)))
        assert comments == {f"{r}:{i}" for r in experts for i in range(250)}
        assert store.review_queue_count(s, reader, need=8) == 0  # every turn has 8 expert reviews
    st.dispose()


WORKER = """
import sys
from annotation_db import Store, store
url, rater, turns = sys.argv[1], int(sys.argv[2]), [int(t) for t in sys.argv[3].split(",")]
st = Store.open(url, migrate=False)
for i in range(250):
    with st.session() as s:
        store.add_rating(s, turns[i % len(turns)], rater, 1 + i % 5, comment=f"{rater}:{i}")
"""


@pytest.mark.slow
def test_four_processes_write_every_rating(url):
    st = Store.open(url)
    experts, turn_ids, reader = _seed(st, 4)
    errors: list[Exception] = []
    stop = threading.Event()
    readers = _readers(st, reader, stop, errors)
    for t in readers:
        t.start()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, str(r), ",".join(map(str, turn_ids))],
                              env=env, stderr=subprocess.PIPE, text=True) for r in experts]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    stop.set()
    for t in readers:
        t.join()
    assert all(rc == 0 for rc, _ in results), [err[-500:] for _, err in results]
    assert not errors, errors[:3]
    with st.session() as s:
        assert s.scalar(select(func.count()).select_from(Rating)) == 4 * 250
    st.dispose()


def test_racing_promotions_leave_one_active(url):
    st = Store.open(url)
    with st.session() as s:
        store.ensure_base_version(s, "base")
        candidates = [store.register_version(s, base_model="base", adapter_path=f"m/{i}").id for i in range(12)]
    errors: list[Exception] = []
    for a, b in zip(candidates[::2], candidates[1::2]):
        barrier = threading.Barrier(2)

        def go(vid: int):
            barrier.wait()
            try:
                with st.session() as s:
                    store.promote(s, vid)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=go, args=(v,)) for v in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with st.session() as s:
            active = [v for v in store.list_versions(s) if v.status is VersionStatus.active]
            assert len(active) == 1 and active[0].id in (a, b)
    assert not errors, errors[:3]
    st.dispose()
