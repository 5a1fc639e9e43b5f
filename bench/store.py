"""Benchmark of the annotation store: write throughput and query times.

    python -m bench.store            # full size: 100 000 turns, 200 000 ratings
    python -m bench.store --quick    # small sizes, a few seconds
    python -m bench.store --pg URL   # also PostgreSQL (a scratch database: it is wiped)

Prints a table: ratings written per second (each its own transaction through
`store.add_rating`) with 1 and 8 concurrent writer threads, and the review-queue,
review-queue-count and gold-pairs times on a database of the stated size (bulk
loaded, then queried through the store API; the median of several runs).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import insert, text

from annotation_db import Store, store
from annotation_db.models import Conversation, Rating, Turn, User


def _reset(url: str) -> None:
    if url.startswith("postgresql"):
        from annotation_db.db import make_engine

        e = make_engine(url)
        with e.begin() as c:
            c.exec_driver_sql("DROP SCHEMA public CASCADE")
            c.exec_driver_sql("CREATE SCHEMA public")
        e.dispose()


def write_rate(url: str, writers: int, per_writer: int) -> float:
    _reset(url)
    st = Store.open(url)
    with st.session() as s:
        doc = store.get_or_create_user(s, "clinician", "clinician")
        experts = [store.get_or_create_user(s, f"e{i}").id for i in range(writers)]
        c = store.start_conversation(s, doc.id, {})
        turns = [store.record_turn(s, c.id, f"q{i}", "a", image_hashes=[], template="t", settings={},
                                   model_version_id=None).id for i in range(100)]

    def work(rater: int) -> None:
        for i in range(per_writer):
            with st.session() as s:
                store.add_rating(s, turns[i % 100], rater, 1 + i % 5, comment="bench")

    threads = [threading.Thread(target=work, args=(e,)) for e in experts]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = writers * per_writer / (time.perf_counter() - t0)
    st.dispose()
    return rate


def load(url: str, n_turns: int, n_ratings: int, n_experts: int = 20) -> Store:
    """Bulk-load a realistic store: old turns well reviewed, a recent backlog unreviewed."""
    _reset(url)
    st = Store.open(url)
    rng = random.Random(0)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with st.session() as s:
        s.execute(insert(User), [{"id": 1, "name": "clinician", "role": "clinician"}] +
                  [{"id": 2 + i, "name": f"expert-{i}", "role": "expert"} for i in range(n_experts)])
        v = store.ensure_base_version(s, "base")
        n_conv = n_turns // 2
        s.execute(insert(Conversation), [{"id": i + 1, "user_id": 1, "context": {"age": 40 + i % 40}}
                                         for i in range(n_conv)])
        # ratings land on the oldest 80 % of turns, ~2.5 each; the newest 20 % are the backlog
        rated = int(n_turns * 0.8)
        per_turn = [0] * n_turns
        ratings = []
        for k in range(n_ratings):
            tid = k % rated
            rater = 2 + (k // rated + tid) % n_experts
            per_turn[tid] += 1
            corr = "Corrected answer." if rng.random() < 0.3 else None
            ratings.append({"turn_id": tid + 1, "rater_id": rater, "model_version_id": v.id,
                            "score": rng.randint(1, 5), "correction": corr, "flags": [],
                            "kind": "full", "created_at": t0 + timedelta(seconds=k)})
        s.execute(insert(Turn), [{
            "id": i + 1, "conversation_id": i // 2 + 1, "seq": i % 2, "question": f"Question {i}?",
            "answer": f"Answer {i}.", "template": "qa", "settings": {}, "model_version_id": v.id,
            "status": "complete",
            "expert_raters": len({2 + (j // rated + i) % n_experts for j in range(i, n_ratings, rated)})
            if i < rated else 0,
            "created_at": t0 + timedelta(seconds=i)} for i in range(n_turns)])
        for i in range(0, len(ratings), 20_000):
            s.execute(insert(Rating), ratings[i:i + 20_000])
    if url.startswith("postgresql"):
        with st.engine.begin() as c:
            c.execute(text("ANALYZE"))
    else:
        with st.engine.begin() as c:
            c.exec_driver_sql("ANALYZE")
    return st


def timed(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def query_times(st: Store) -> dict[str, float]:
    out = {}
    with st.session() as s:
        v = store.active_version(s)
        out["review_queue (1 item)"] = timed(lambda: store.review_queue(s, 2, limit=1))
        out["review_queue (page of 20, need=3)"] = timed(lambda: store.review_queue(s, 2, need=3, limit=20))
        out["review_queue_count"] = timed(lambda: store.review_queue_count(s, 2))
        out["gold_pairs (all)"] = timed(lambda: store.gold_pairs(s), repeat=3)
        run = store.start_training_run(s, {})
        ids = [r for (r,) in s.execute(text("SELECT id FROM ratings WHERE turn_id <= :n"), {"n": 0.75 * st_turns})]
        store.finish_training_run(s, run.id, status="completed", counts={}, rating_ids=ids,
                                  synthetic_ids=[], report={})
        v2 = store.register_version(s, base_model="base", parent_id=v.id, training_run_id=run.id)
        out["gold_pairs (new since version)"] = timed(lambda: store.gold_pairs(s, since_version_id=v2.id),
                                                       repeat=3)
        s.rollback()
    return out


st_turns = 0


def main(argv: list[str] | None = None) -> None:
    global st_turns
    p = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (seconds, for CI)")
    p.add_argument("--pg", default=os.environ.get("DERMALOOP_BENCH_PG_URL"),
                   help="PostgreSQL URL of a scratch database: its public schema is dropped "
                        "(default: $DERMALOOP_BENCH_PG_URL)")
    args = p.parse_args(argv)
    n_turns, n_ratings, per_writer = (2_000, 4_000, 50) if args.quick else (100_000, 200_000, 250)
    st_turns = n_turns
    with tempfile.TemporaryDirectory() as tmp:
        backends = [("SQLite (WAL)", f"sqlite:///{Path(tmp) / 'bench.db'}")]
        if args.pg:
            backends.append(("PostgreSQL", args.pg))
        rows = []
        for name, url in backends:
            if url.startswith("sqlite"):
                Path(tmp, "bench.db").unlink(missing_ok=True)
            w1 = write_rate(url, 1, per_writer * 2)
            if url.startswith("sqlite"):
                for f in Path(tmp).glob("bench.db*"):
                    f.unlink()
            w8 = write_rate(url, 8, per_writer)
            if url.startswith("sqlite"):
                for f in Path(tmp).glob("bench.db*"):
                    f.unlink()
            t0 = time.perf_counter()
            st = load(url, n_turns, n_ratings)
            load_s = time.perf_counter() - t0
            q = query_times(st)
            st.dispose()
            rows.append((name, w1, w8, load_s, q))
    print(f"annotation store benchmark: {n_turns:,} turns, {n_ratings:,} ratings, {os.cpu_count()} cores")
    print(f"{'backend':<14} {'measure':<36} {'value':>12}")
    for name, w1, w8, load_s, q in rows:
        print(f"{name:<14} {'ratings/s, 1 writer':<36} {w1:>12.0f}")
        print(f"{name:<14} {'ratings/s, 8 writers (threads)':<36} {w8:>12.0f}")
        print(f"{name:<14} {'bulk load (s)':<36} {load_s:>12.1f}")
        for k, ms in q.items():
            print(f"{name:<14} {k + ' (ms)':<36} {ms:>12.1f}")


if __name__ == "__main__":
    main()
