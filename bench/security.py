"""Benchmark of the app under hostile and heavy use: a login flood, and a rating load run.

    python -m bench.security            # flood 8 x 6 s, 8 raters x 100 ratings (about a minute)
    python -m bench.security --quick    # smaller

Login flood: 8 clients send wrong passwords (bcrypt cost 12, as `demo.auth` writes) while
a ninth times `GET /healthz`. Measured twice in the same run, on the same app: with
bcrypt called on the event loop (Gradio's plain `auth=` callable: the baseline) and
with `demo.security.LoginGuard` (threads, at most 2 hashes at once). The per-address
back-off is switched off for this, as for a flood from many addresses. Prints the
median and p95 latencies and their ratios.

Load run: R experts rate one answer each N times through `/rate` (gradio_client),
concurrently, with the per-user call limit lifted (a script, not a person); prints
ratings sent, acknowledged (a rating id came back) and stored.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path


def _latencies(url: str, seconds: float) -> list[float]:
    import httpx

    out: list[float] = []
    end = time.perf_counter() + seconds
    with httpx.Client(timeout=60) as c:
        while time.perf_counter() < end:
            t = time.perf_counter()
            c.get(url + "healthz")
            out.append(time.perf_counter() - t)
            time.sleep(0.02)
    return out


def _flood(url: str, seconds: float, clients: int) -> int:
    import httpx

    sent = [0]
    end = time.perf_counter() + seconds

    def one(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            while time.perf_counter() < end:
                c.post(url + "login", data={"username": "eve" if i % 2 else f"nobody{i}", "password": "guess"})
                sent[0] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return sent[0]


def _app(home: Path, model_dir: Path, users: Path, guarded: bool):
    from annotation_db.db import Store
    from core.config import Settings
    from core.engine import Engine
    from core.models import load_model
    from demo.app import build_demo, launch_kwargs
    from demo.auth import AuthConfig
    from demo.runtime import DemoOptions, attach
    from demo.security import LoginGuard, LoginPolicy

    settings = Settings.from_env(home=home, model=str(model_dir), max_new_tokens=8)
    store = Store.open(settings.db_url)
    auth = AuthConfig.from_file(users)
    runtime = attach(settings, Engine(load_model(model_dir), settings), store, DemoOptions())
    demo = build_demo(settings, auth=auth, options=DemoOptions(), runtime=runtime)
    kwargs = launch_kwargs(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    guard = LoginGuard(auth, LoginPolicy(max_failures=10**9))  # no back-off: a flood from many addresses
    kwargs["auth"] = guard.check if guarded else guard.verify  # verify: bcrypt on the event loop
    kwargs["app_kwargs"] = {"middleware": [m for m in kwargs["app_kwargs"]["middleware"]
                                           if m.cls.__name__ == "HealthEndpoint"]}
    demo.launch(**kwargs)
    return demo, store, f"http://127.0.0.1:{demo.server_port}/"


def login_flood(model_dir: Path, seconds: float, clients: int) -> None:
    from demo.auth import add_user

    rows = []
    with tempfile.TemporaryDirectory() as d:
        users = Path(d) / "users.yaml"
        add_user(users, "eve", "expert", "a long passphrase", rounds=12)
        for guarded in (False, True):
            demo, store, url = _app(Path(d) / f"home-{guarded}", model_dir, users, guarded)
            try:
                idle = _latencies(url, 2.0)
                result: dict = {}
                flood = threading.Thread(target=lambda: result.update(sent=_flood(url, seconds, clients)))
                flood.start()
                time.sleep(0.5)
                busy = _latencies(url, seconds - 1.0)
                flood.join()
                rows.append((guarded, statistics.median(idle), statistics.median(busy),
                             statistics.quantiles(busy, n=20)[-1], result["sent"]))
            finally:
                demo.close()
                store.dispose()
    print(f"login flood: {clients} clients, {seconds:.0f} s, bcrypt cost 12; GET /healthz latency")
    print(f"{'logins':<22}{'idle median':>12}{'flood median':>14}{'flood p95':>11}{'attempts':>10}")
    for guarded, idle, busy, p95, sent in rows:
        name = "LoginGuard (threads)" if guarded else "on the event loop"
        print(f"{name:<22}{idle * 1000:>10.1f}ms{busy * 1000:>12.1f}ms{p95 * 1000:>9.1f}ms{sent:>10}")
    (_, _, base, base95, _), (_, _, ours, ours95, _) = rows
    print(f"ratio guarded / event loop: median {ours / base:.3f}, p95 {ours95 / base95:.3f}")


def load_run(model_dir: Path, raters: int, each: int) -> None:
    from gradio_client import Client, handle_file

    from annotation_db.export import frames
    from demo.auth import add_user

    with tempfile.TemporaryDirectory() as d:
        users = Path(d) / "users.yaml"
        for i in range(raters):
            add_user(users, f"expert{i}", "expert", "pw", rounds=4)
        add_user(users, "cara", "clinician", "pw", rounds=4)
        demo, store, url = _app(Path(d) / "home", model_dir, users, guarded=True)
        from demo.security import UsageLimits, UsagePolicy

        demo.dermaloop.limits = UsageLimits(UsagePolicy(calls_per_minute=10**6))  # a script, not a person
        try:
            from PIL import Image, ImageDraw

            lesion = Image.new("RGB", (96, 80), (225, 190, 160))
            ImageDraw.Draw(lesion).ellipse((24, 20, 72, 60), fill=(120, 60, 40))
            lesion.save(Path(d) / "lesion.png")
            _, _, turn_id, _ = Client(url, auth=("cara", "pw"), verbose=False).predict(
                [handle_file(str(Path(d) / "lesion.png"))], "What is it?", "", "", api_name="/ask")
            acked = [0]

            def rate(i: int) -> None:
                client = Client(url, auth=(f"expert{i}", "pw"), verbose=False)
                for k in range(each):
                    try:
                        client.predict(turn_id, 1 + (i + k) % 5, "", "", "", api_name="/rate")
                        acked[0] += 1
                    except Exception:  # noqa: BLE001  (counted as not acknowledged)
                        pass

            threads = [threading.Thread(target=rate, args=(i,)) for i in range(raters)]
            start = time.perf_counter()
            [t.start() for t in threads]
            [t.join() for t in threads]
            seconds = time.perf_counter() - start
            with store.session() as s:
                stored = len(frames(s)["ratings"])
        finally:
            demo.close()
            store.dispose()
    print(f"load run: {raters} raters x {each} ratings: sent {raters * each}, acknowledged {acked[0]}, "
          f"stored {stored} in {seconds:.1f} s")


def main() -> None:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    parser = argparse.ArgumentParser(prog="python -m bench.security", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from core.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as d:
        model_dir = build_tiny_model(Path(d) / "tiny", family="smolvlm", seed=0)
        login_flood(model_dir, 4.0 if args.quick else 6.0, 8)
        load_run(model_dir, 4 if args.quick else 8, 20 if args.quick else 100)


if __name__ == "__main__":
    main()
